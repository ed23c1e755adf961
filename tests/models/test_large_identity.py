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
from llm_modules.models.config import CONFIG_FILE
from llm_modules.models.large_identity import weights_digest


@pytest.fixture
def saved(tiny_pair_with_tokenizer, tmp_path):
    """A large model folder of our own (so the test may overwrite it) and a model saved on it."""
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


def test_digest_samples_without_copying_whole_tensors(monkeypatch):
    big = torch.nn.Embedding(50_000, 64)  # 3.2M values; a sample is 4096 of them
    seen = []  # sizes of every copy made and every array hashed
    real_contiguous, real_numpy = torch.Tensor.contiguous, torch.Tensor.numpy

    def contiguous(self, *args, **kwargs):
        out = real_contiguous(self, *args, **kwargs)
        if out.data_ptr() != self.data_ptr():
            seen.append(out.numel())
        return out

    def numpy(self, *args, **kwargs):
        seen.append(self.numel())
        return real_numpy(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "contiguous", contiguous)
    monkeypatch.setattr(torch.Tensor, "numpy", numpy)
    first = weights_digest(big)
    monkeypatch.undo()
    assert seen and max(seen) <= 4 * 8192  # bytes of a sample, never the 12.8 MB matrix
    with torch.no_grad():
        big.weight[0, 0] += 1  # an element on the sampling stride changes the digest
    assert weights_digest(big) != first
    assert weights_digest(copy.deepcopy(big).to(torch.bfloat16)) != weights_digest(big)
