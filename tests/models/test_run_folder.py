"""A training output folder is a model: its best/ (else last/) loads wherever a saved model does."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from llm_modules import LLMModulesModel
from llm_modules.entrypoints.cli import main
from llm_modules.errors import LLMModulesError

from ..helpers import write_data


@pytest.fixture
def run_folder(tiny_pair_with_tokenizer, tmp_path):
    """A run folder as `train --output` leaves it: run_config.json, best/ and last/ with other weights."""
    torch.manual_seed(0)
    model = LLMModulesModel.compose(large=tiny_pair_with_tokenizer["large"], small=tiny_pair_with_tokenizer["small"],
                                    head="new")
    run = tmp_path / "run"
    model.save_pretrained(run / "last")
    with torch.no_grad():
        model.bridge.pre_proj.bias.fill_(0.5)
    model.save_pretrained(run / "best")
    data = write_data(tmp_path / "data.jsonl", n=10)
    (run / "run_config.json").write_text(json.dumps({"data": data, "template": "stratos", "max_length": 512,
                                                     "val_fraction": 0.2, "seed": 0}))
    return run


def test_from_pretrained_takes_best_then_last_and_says_which(run_folder, caplog):
    with caplog.at_level(logging.INFO, logger="llm_modules"):
        best = LLMModulesModel.from_pretrained(run_folder)
    assert torch.all(best.bridge.pre_proj.bias == 0.5)
    said = [r.getMessage() for r in caplog.records if "best" in r.getMessage()]
    assert len(said) == 1 and str(run_folder / "best") in said[0]
    caplog.clear()
    for path in (run_folder / "best").iterdir():
        path.unlink()
    with caplog.at_level(logging.INFO, logger="llm_modules"):
        last = LLMModulesModel.from_pretrained(run_folder)
    assert not torch.all(last.bridge.pre_proj.bias == 0.5)
    assert any(str(run_folder / "last") in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("content", ["empty", "foreign", "run_without_model"])
def test_empty_or_foreign_folder_names_what_was_expected(tmp_path, content):
    folder = tmp_path / "folder"
    folder.mkdir()
    if content == "foreign":
        (folder / "notes.txt").write_text("hello")
    elif content == "run_without_model":
        (folder / "run_config.json").write_text("{}")
        (folder / "checkpoints").mkdir()
    with pytest.raises(LLMModulesError) as err:
        LLMModulesModel.from_pretrained(folder)
    message = str(err.value)
    assert str(folder) in message and "best/" in message and "last/" in message
    assert "llm_modules_config.json" in message


def test_cli_eval_generate_and_info_on_a_run_folder_use_its_best(run_folder, capsys, caplog):
    def run(*args: str) -> tuple[str, list[str]]:
        caplog.clear()
        assert main(list(args)) == 0
        return capsys.readouterr().out, [r.getMessage() for r in caplog.records]

    def says_best(said: list[str]) -> bool:
        return any(str(run_folder / "best") in message for message in said)

    def evaluated(model: str) -> tuple[float, float]:
        result = json.loads(run("eval", "--model", model, "--no-generate")[0].strip().splitlines()[-1])
        return result["loss"], result["bits_per_byte"]

    # Each command on the run folder prints what it prints on best/ named outright, and not what it
    # prints on last/, and says which folder it took.
    out, said = run("eval", "--model", str(run_folder), "--no-generate")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["examples"] >= 1 and says_best(said)
    assert (result["loss"], result["bits_per_byte"]) == evaluated(str(run_folder / "best"))
    assert (result["loss"], result["bits_per_byte"]) != evaluated(str(run_folder / "last"))
    prompt = ("--prompt", "What is 2 plus 2?", "--max-new-tokens", "8")
    out, said = run("generate", "--model", str(run_folder), *prompt)
    assert out.strip() and says_best(said)
    assert out == run("generate", "--model", str(run_folder / "best"), *prompt)[0]
    assert out != run("generate", "--model", str(run_folder / "last"), *prompt)[0]
    out, said = run("info", "--model", str(run_folder))
    assert says_best(said) and out == run("info", "--model", str(run_folder / "best"))[0]  # same counts as last/

    (run_folder / "checkpoints").mkdir()
    assert main(["eval", "--model", str(run_folder / "checkpoints"), "--data", "x.jsonl"]) == 2
    assert "best/" in capsys.readouterr().err
