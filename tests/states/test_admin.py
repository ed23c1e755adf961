"""`llm-modules cache ls|prune` and the state cache's size cap (oldest first, never one in use)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from llm_modules import LLMModulesModel
from llm_modules.data.prepare import TokenizedExample
from llm_modules.entrypoints.cli import main
from llm_modules.states.admin import enforce_size_cap, list_caches, max_cache_bytes
from llm_modules.states.fence import build_name, host_name
from llm_modules.states.store import StateCache, state_cache_key


@pytest.fixture(scope="module")
def model(tiny_models):
    torch.manual_seed(0)
    return LLMModulesModel.compose(large=tiny_models["qwen2"], small=tiny_models["llama"]).eval()


def three_caches(root, model):
    """Three complete caches, used at times 1000, 2000 and 3000 (oldest first)."""
    caches = []
    for n, used in ((3, 1000), (5, 2000), (7, 3000)):
        ids = list(range(1, n + 1))
        examples = [TokenizedExample(ids, ids, SimpleNamespace(source="t"))]
        cache = StateCache.open_or_build(root, state_cache_key(model, f"data-{n}"), model, examples, progress=False)
        os.utime(cache.path / "index.json", (used, used))
        caches.append(cache)
    (root / build_name("0" * 64, host_name(), 999999999, "dead")).mkdir()  # a dead build on this host
    return caches


def bytes_on_disk(folder) -> int:
    """The length of every file under `folder`, at any depth, as the file system reports it."""
    return sum(os.path.getsize(os.path.join(parent, name)) for parent, _, names in os.walk(folder) for name in names)


def test_ls_lists_each_cache_with_its_size_and_examples(tmp_path, model, capsys):
    caches = three_caches(tmp_path, model)
    entries = list_caches(tmp_path)
    assert [e.key for e in entries] == [c.path.name for c in caches]  # oldest first
    on_disk = [bytes_on_disk(c.path) for c in caches]
    assert [e.size_bytes for e in entries] == on_disk
    for tokens, size in zip((3, 5, 7), on_disk):  # at least the float32 states: (T, K, d_large)
        assert size > tokens * len(model.large_taps) * model.large.config.hidden_size * 4
    assert [e.examples for e in entries] == [1, 1, 1]
    assert main(["cache", "ls", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 + 3 + 1  # header, three caches, total
    for cache, line in zip(caches, out[1:4]):
        assert line.startswith(cache.path.name[:16])
    assert out[-1].startswith("total") and f"{sum(on_disk) / 2**20:.2f} MiB" in out[-1]


def test_size_cap_evicts_oldest_first_but_never_a_cache_in_use(tmp_path, model, monkeypatch):
    caches = three_caches(tmp_path, model)
    sizes = [bytes_on_disk(c.path) for c in caches]
    # Room for the two newest: the oldest goes.
    removed = enforce_size_cap(tmp_path, max_bytes=sizes[1] + sizes[2], keep=set())
    assert removed == [caches[0].path] and not caches[0].path.exists() and caches[1].path.exists()
    # Room for nothing, but the oldest of the rest is in use by this run: only the newest goes.
    removed = enforce_size_cap(tmp_path, max_bytes=0, keep={caches[1].path.name})
    assert removed == [caches[2].path] and caches[1].path.exists()
    monkeypatch.setenv("LLM_MODULES_CACHE_MAX_GB", "0.5")
    assert max_cache_bytes() == 2**29
    monkeypatch.delenv("LLM_MODULES_CACHE_MAX_GB")
    assert max_cache_bytes() == 50 * 2**30  # the documented default


def test_prune_command(tmp_path, model, capsys):
    caches = three_caches(tmp_path, model)
    assert main(["cache", "prune", "--dir", str(tmp_path), "--max-gb", "0"]) == 0
    assert not any(c.path.exists() for c in caches)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # dead builds go too
    assert "removed 3 caches" in capsys.readouterr().out
    caches = three_caches(tmp_path, model)
    assert main(["cache", "prune", "--dir", str(tmp_path)]) == 0  # under the default cap: only dead builds
    assert all(c.path.exists() for c in caches)
