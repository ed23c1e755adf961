"""Cached large-model states: equal to a fresh forward, reused by key, rebuilt when stale or partial."""

from __future__ import annotations

import json
import os

import pytest
import torch

from llm_modules import LLMModulesModel
from llm_modules.data.prepare import collate
from llm_modules.errors import LLMModulesError
from llm_modules.states.fence import build_name, host_name
from llm_modules.states.store import INDEX_FILE, StateCache, prune, state_cache_key
from llm_modules.tensors import positions_from_mask

from ..helpers import STATE_LENGTHS, make_examples


@pytest.fixture(scope="module")
def model(tiny_models):
    torch.manual_seed(0)
    return LLMModulesModel.compose(large=tiny_models["qwen2"], small=tiny_models["llama"]).eval()


def build(tmp_path, model, examples, fp="data-a", dtype="float32", **kw):
    key = state_cache_key(model, fp, dtype)
    return StateCache.open_or_build(tmp_path, key, model, examples, dtype=dtype, progress=False, **kw)


def test_states_equal_unpadded_forward_and_loss_matches(tmp_path, model):
    examples = make_examples(model)
    cache = build(tmp_path, model, examples, batch_size=4, shard_bytes=2000)  # several shards
    assert cache.built and len(cache) == len(examples)
    assert len(list(cache.path.glob("shard-*.safetensors"))) > 1
    for i, e in enumerate(examples):
        ids = torch.tensor([e.input_ids])
        mask = torch.ones_like(ids)
        alone, _ = model.encode_large(ids, mask, positions_from_mask(mask))  # (1, T_i, K, dL)
        got = cache[i]
        assert got.shape == (len(e.input_ids), 1, alone.shape[-1]) and got.dtype == torch.float32
        torch.testing.assert_close(got, alone[0], atol=1e-5, rtol=0)

    rows = [1, 3, 6, 0]  # mixed lengths: right padding
    batch = collate([examples[i] for i in rows], pad_id=0)
    width = batch["input_ids"].shape[1]
    states = cache.batch(rows, pad_to=width)
    assert states.shape == (len(rows), width, 1, cache.d_large)
    assert torch.all(states[1, STATE_LENGTHS[3]:] == 0)
    with torch.no_grad():
        ref = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
        got = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], large_states=states)
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-5, rtol=0)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(got.logits[valid], ref.logits[valid], atol=1e-5, rtol=0)
    with pytest.raises(LLMModulesError):
        cache.batch([6], pad_to=5)


def test_same_key_reuses_without_recompute(tmp_path, model, monkeypatch):
    examples = make_examples(model)
    first = build(tmp_path, model, examples)
    assert first.built

    def boom(*args, **kwargs):
        raise AssertionError("encode_large must not run on a cache hit")

    monkeypatch.setattr(model, "encode_large", boom)
    second = build(tmp_path, model, examples)
    assert not second.built and second.path == first.path and second.size_bytes == first.size_bytes
    for i in range(len(examples)):
        assert torch.equal(second[i], first[i])
    with pytest.raises(LLMModulesError, match="other examples"):  # same key, other examples: refuse
        build(tmp_path, model, make_examples(model, seed=2))


def test_key_covers_data_dtype_and_large_model(tmp_path, model, tiny_models):
    key = state_cache_key(model, "data-a", "float32")
    assert key == state_cache_key(model, "data-a", "float32")
    torch.manual_seed(5)  # other bridge init, same large model: same key
    again = LLMModulesModel.compose(large=tiny_models["qwen2"], small=tiny_models["gpt2"])
    assert state_cache_key(again, "data-a", "float32") == key
    other_large = LLMModulesModel.compose(large=tiny_models["llama"], small=tiny_models["gpt2"])
    assert state_cache_key(other_large, "data-a", "float32") != key
    with torch.no_grad():
        again.large.get_output_embeddings().weight[0, 0] += 1.0  # a changed large weight
    assert state_cache_key(again, "data-a", "float32") != key
    assert len({key, state_cache_key(model, "data-b", "float32"), state_cache_key(model, "data-a", "float16")}) == 3
    with pytest.raises(LLMModulesError):
        state_cache_key(model, "data-a", "int8")

    examples = make_examples(model)
    a = build(tmp_path, model, examples, fp="data-a")
    b = build(tmp_path, model, examples, fp="data-b")
    half = build(tmp_path, model, examples, fp="data-a", dtype="float16")
    assert b.built and half.built and len({a.path, b.path, half.path}) == 3
    assert half[0].dtype == torch.float16
    assert 0.45 < half.size_bytes / a.size_bytes < 0.6
    torch.testing.assert_close(half[4].float(), a[4], atol=2e-2, rtol=1e-2)
    assert all(p.exists() for p in (a.path, b.path, half.path))  # old folders are kept

    removed = prune(tmp_path, keep={a.path.name})
    assert set(removed) == {b.path, half.path} and a.path.exists()
    assert not b.path.exists() and not half.path.exists()


def test_partial_builds_are_rebuilt_not_read(tmp_path, model):
    examples = make_examples(model)
    key = state_cache_key(model, "data-a", "float32")
    folder = tmp_path / key
    folder.mkdir()
    torch.save(torch.zeros(1), folder / "shard-00000.safetensors")  # junk from a killed build
    dead = tmp_path / build_name(key, host_name(), 999999999, "dead")  # a leftover build of a dead process
    dead.mkdir()
    (dead / INDEX_FILE).write_text("{}")
    cache = build(tmp_path, model, examples)
    assert cache.built and cache.path == folder and not dead.exists()
    assert json.loads((folder / INDEX_FILE).read_text())["n"] == len(examples)
    ref = cache[2].clone()

    (folder / INDEX_FILE).write_text('{"format": 1, "key": "')  # truncated index: not complete
    rebuilt = build(tmp_path, model, examples)
    assert rebuilt.built and torch.equal(rebuilt[2], ref)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_failed_build_leaves_nothing(tmp_path, model, monkeypatch):
    examples = make_examples(model)
    calls = []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return LLMModulesModel.encode_large(model, *args, **kwargs)

    monkeypatch.setattr(model, "encode_large", fail_second)
    with pytest.raises(RuntimeError, match="killed"):
        build(tmp_path, model, examples, batch_size=2)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert build(tmp_path, model, examples).built
    assert os.path.isfile(tmp_path / state_cache_key(model, "data-a", "float32") / INDEX_FILE)


def test_key_covers_library_versions_and_attention_implementation(model, monkeypatch):
    import transformers

    import llm_modules.states.store as sc

    key = state_cache_key(model, "data-a", "float32")
    for module, attribute, value in ((torch, "__version__", "0.0.1"), (transformers, "__version__", "0.0.1"),
                                     (sc, "__version__", "0.0.1")):
        with monkeypatch.context() as m:
            m.setattr(module, attribute, value)
            assert state_cache_key(model, "data-a", "float32") != key, (module, attribute)
    assert state_cache_key(model, "data-a", "float32") == key
    other = "eager" if model.large.config._attn_implementation != "eager" else "sdpa"
    monkeypatch.setattr(model.large.config, "_attn_implementation", other)
    assert state_cache_key(model, "data-a", "float32") != key


def test_a_new_split_of_the_same_examples_reuses_their_states(tmp_path, model, monkeypatch):
    from llm_modules.states.store import examples_digest, model_state_key

    examples = make_examples(model)
    dtype = "float16"  # reused states are copied as stored, not recomputed and rounded again
    mkey = model_state_key(model, dtype)

    def cache_of(rows):
        chosen = [examples[i] for i in rows]
        return StateCache.open_or_build(tmp_path, state_cache_key(model, examples_digest(chosen), dtype), model,
                                        chosen, dtype=dtype, progress=False, model_key=mkey)

    train, val = cache_of([0, 1, 2, 3, 4, 5, 6, 7]), cache_of([8, 9, 10])  # one seed's split
    assert train.computed == 8 and val.computed == 3
    encoded = []
    real = model.encode_large

    def counting(ids, *args, **kwargs):
        encoded.append(ids.shape[0])
        return real(ids, *args, **kwargs)

    monkeypatch.setattr(model, "encode_large", counting)
    new_train = cache_of([10, 2, 9, 4, 0, 7, 5])  # another seed and val fraction over the same data
    assert new_train.built and new_train.computed == 0 and sum(encoded) == 0
    assert torch.equal(new_train[0], val[2]) and torch.equal(new_train[1], train[2])
    with_new = make_examples(model, lengths=[6, 8], seed=9)
    examples.extend(with_new)
    mixed = cache_of([11, 3, 12])
    assert mixed.computed == 2 and sum(encoded) == 2  # only the two examples never seen run the large model
    assert torch.equal(mixed[1], train[3])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_cache_says_the_head_trains_on_rounded_states(tmp_path, model, tiny_models, caplog, dtype):
    examples = make_examples(model)
    with caplog.at_level("WARNING", logger="llm_modules"):
        half = build(tmp_path, model, examples, dtype=dtype)
    said = [r.getMessage() for r in caplog.records if "rounded" in r.getMessage()]
    assert len(said) == 1 and dtype in said[0] and "residual" in said[0] and "float32" in said[0]
    # The measured difference it speaks of: the residual head's base logits from rounded states
    # against the float32 states generation uses (tiny model: nonzero, well under 0.1).
    full = build(tmp_path, model, examples, dtype="float32")
    head = model.large.get_output_embeddings()
    with torch.no_grad():
        gap = max((head(half[i].float()) - head(full[i])).abs().max().item() for i in range(len(examples)))
    assert 0 < gap < 0.1
    caplog.clear()
    new_head = LLMModulesModel.compose(large=tiny_models["qwen2"], small=tiny_models["llama"], head="new")
    with caplog.at_level("WARNING", logger="llm_modules"):
        build(tmp_path / "new", new_head, examples, dtype=dtype)  # the `new` head never reads the states
    assert not [r for r in caplog.records if "rounded" in r.getMessage()]
