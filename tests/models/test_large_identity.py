"""A saved composed model pins its large model: a weights digest saved beside it, checked on load."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_modules import LLMModulesModel
from llm_modules.entrypoints.cli import main
from llm_modules.errors import LLMModulesError
from llm_modules.models.large_identity import sampled_digest, weights_digest
from llm_modules.models.saved import CONFIG_FILE


@pytest.fixture
def saved(tiny_pair_with_tokenizer, tmp_path, monkeypatch):
    """A large model folder of our own (so the test may overwrite it) and a model saved on it."""
    monkeypatch.setenv("LLM_MODULES_CACHE", str(tmp_path / "cache"))  # the digests kept per model file
    large = tmp_path / "large"
    AutoModelForCausalLM.from_pretrained(tiny_pair_with_tokenizer["large"]).save_pretrained(large)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        source = tiny_pair_with_tokenizer["large"] + "/" + name
        try:
            (large / name).write_bytes(open(source, "rb").read())
        except FileNotFoundError:
            pass
    torch.manual_seed(0)
    model = LLMModulesModel.compose(large=str(large), small=tiny_pair_with_tokenizer["small"], head="new")
    model.save_pretrained(tmp_path / "model")
    return large, tmp_path / "model"


def overwrite_large(large) -> None:
    """The large model's folder now holds other weights (a re-download, a new export...)."""
    weights = AutoModelForCausalLM.from_pretrained(large)
    with torch.no_grad():
        weights.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    weights.save_pretrained(large)


def test_saved_config_holds_the_digest_and_the_same_large_model_loads(saved):
    large, folder = saved
    identity = json.loads((folder / CONFIG_FILE).read_text())["large_identity"]
    loaded = LLMModulesModel.from_pretrained(folder)
    assert identity["digests"]["float32"] == weights_digest(loaded.large)
    assert set(identity["digests"]) == {"float32", "bfloat16", "float16"}
    # Loaded in another precision, the check uses the digest of that precision.
    LLMModulesModel.from_pretrained(folder, large_dtype=torch.bfloat16)


def test_changed_large_model_is_an_error_naming_both_digests(saved, caplog):
    large, folder = saved
    before = json.loads((folder / CONFIG_FILE).read_text())["large_identity"]["digests"]["float32"]
    overwrite_large(large)
    with pytest.raises(LLMModulesError) as err:
        LLMModulesModel.from_pretrained(folder)
    now = weights_digest(AutoModelForCausalLM.from_pretrained(large))
    message = str(err.value)
    assert before in message and now in message and "allow-large-mismatch" in message
    with caplog.at_level(logging.WARNING, logger="llm_modules"):
        LLMModulesModel.from_pretrained(folder, allow_large_mismatch=True)
    assert any(before in r.getMessage() for r in caplog.records)


def test_cli_refuses_a_changed_large_model_unless_allowed(saved, capsys):
    large, folder = saved
    overwrite_large(large)
    args = ["generate", "--model", str(folder), "--prompt", "hi", "--max-new-tokens", "1"]
    assert main(args) == 2
    assert "digest" in capsys.readouterr().err
    assert main([*args, "--allow-large-mismatch"]) == 0
    for command in ("eval", "chat"):
        assert "--allow-large-mismatch" in main_help(command)


def main_help(command: str) -> str:
    from llm_modules.entrypoints.cli import build_parser

    return build_parser()._subparsers._group_actions[0].choices[command].format_help()


def test_old_folder_without_digest_loads_with_a_one_line_warning(saved, caplog):
    _, folder = saved
    config = json.loads((folder / CONFIG_FILE).read_text())
    del config["large_identity"]
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="llm_modules"):
        LLMModulesModel.from_pretrained(folder)
    said = [r.getMessage() for r in caplog.records if "digest" in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0]


def test_digest_covers_every_value_without_copying_whole_tensors(monkeypatch):
    """Format 2 hashes every value (format 1 sampled 4,096 per parameter, so an edit between samples went
    unnoticed), streamed in chunks: no whole tensor is copied (issue 28, item 15)."""
    from llm_modules.models import large_identity

    big = torch.nn.Embedding(80_000, 64)  # 5.1M values, two blocks; format 1 hashed every 1250th
    first = weights_digest(big)
    assert sampled_digest(big) != first  # a different digest format
    before_sampled = sampled_digest(big)
    with torch.no_grad():
        big.weight[0, 1] += 1  # between two of format 1's samples
    assert sampled_digest(big) == before_sampled  # what format 1 missed
    assert weights_digest(big) != first
    assert weights_digest(copy.deepcopy(big).to(torch.bfloat16)) != weights_digest(big)
    seen = []  # sizes of every array hashed
    real_numpy = torch.Tensor.numpy

    def numpy(self, *args, **kwargs):
        seen.append(self.numel())
        return real_numpy(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "numpy", numpy)
    both = large_identity.weights_digests(big, ["native", "bfloat16"])
    monkeypatch.undo()
    assert seen and max(seen) <= 4 * large_identity.BLOCK < 4 * big.weight.numel()  # blocks, never the matrix
    assert both["native"] == weights_digest(big)  # one pass for several precisions, the same digests
    assert both["bfloat16"] == weights_digest(copy.deepcopy(big).to(torch.bfloat16))


def test_an_edit_between_the_old_samples_is_caught_and_old_records_still_check(saved, monkeypatch):
    large, folder = saved
    identity = json.loads((folder / CONFIG_FILE).read_text())["large_identity"]
    assert identity["digest_format"] == 2
    weights = AutoModelForCausalLM.from_pretrained(large)
    format1 = {"dtype": "float32", "digests": {"float32": sampled_digest(weights)}}
    with torch.no_grad():
        weights.model.embed_tokens.weight[0, 1] += 1e-3  # one value, between format 1's samples
    assert sampled_digest(weights) == format1["digests"]["float32"]  # format 1 cannot see it
    weights.save_pretrained(large)
    with pytest.raises(LLMModulesError, match="digest"):
        LLMModulesModel.from_pretrained(folder)
    # A folder saved before format 2 (sampled digests, no digest_format) is checked with its own format.
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, "large_identity": format1}))
    LLMModulesModel.from_pretrained(folder)


def test_digests_are_kept_per_model_file_and_in_memory_until_a_weight_changes(saved, monkeypatch):
    from llm_modules.models import large_identity
    from llm_modules.states.store import large_weights_digest

    large, folder = saved
    computed = []
    real = large_identity.weights_digests

    def counting(module, dtypes):
        computed.append(list(dtypes))
        return real(module, dtypes)

    monkeypatch.setattr(large_identity, "weights_digests", counting)
    model = LLMModulesModel.from_pretrained(folder)  # the digest kept for this file when composed
    first = large_weights_digest(model.large)  # the state cache's key: from memory
    assert computed == []
    with torch.no_grad():
        model.large.model.norm.weight.mul_(2)  # changed in memory: computed again
    assert large_weights_digest(model.large) != first and computed == [["native"]]
    overwrite_large(large)  # another file (size or mtime): computed again, and refused
    with pytest.raises(LLMModulesError, match="digest"):
        LLMModulesModel.from_pretrained(folder)
    assert len(computed) == 2
