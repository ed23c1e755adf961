"""What a command does when something is wrong: one line and exit status 2 (no traceback), checked
before the slow work, nothing left broken behind (issue 28, items 10 to 14)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llm_modules import LLMModulesModel
from llm_modules.entrypoints.cli import main
from llm_modules.models.saved import RUN_CONFIG_FILE, WEIGHTS_FILE


def write_data(path: Path, n: int = 12) -> str:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"What is {i} plus 1?", "completion": f"{i + 1}", "answer": str(i + 1)}) + "\n")
    return str(path)


def one_error_line(capsys) -> str:
    """The command's error: exactly one `error:` line on stderr, no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture(scope="module")
def run_folder(tiny_pair_with_tokenizer, tmp_path_factory) -> Path:
    """A training run folder as `train` leaves it: best/ (an untrained composed model) and run_config.json."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = LLMModulesModel.compose(large=tiny_pair_with_tokenizer["large"], small=tiny_pair_with_tokenizer["small"],
                                    head="new")
    model.save_pretrained(run / "best")
    data = write_data(run / "data.jsonl")
    (run / RUN_CONFIG_FILE).write_text(json.dumps({"data": data, "template": "stratos", "max_length": 512}))
    return run


def broken_copy(run_folder: Path, tmp_path: Path, name: str, content: bytes) -> Path:
    """A copy of the run folder whose file `name` (relative to it) holds `content`."""
    copy = tmp_path / "broken"
    shutil.copytree(run_folder, copy)
    (copy / name).write_bytes(content)
    return copy


def refuse_to_load(monkeypatch) -> None:
    """Fail the test if a model starts loading: the check must come first."""
    def loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(LLMModulesModel, "from_pretrained", loading)
    monkeypatch.setattr("llm_modules.evaluation.harness.load_scorer", loading)


# ----------------------------------------------------------------------------- item 10
def test_a_refused_train_leaves_its_output_folder_usable(tiny_pair_with_tokenizer, tmp_path, capsys, monkeypatch):
    """Every check runs before run_config.json is written: the corrected rerun starts in the same folder,
    and a run that failed before training anything starts again without --resume."""
    import llm_modules.training.loop as loop

    data = write_data(tmp_path / "data.jsonl")

    def train(*extra: str) -> int:
        return main(["train", "--large", tiny_pair_with_tokenizer["large"], "--small", tiny_pair_with_tokenizer["small"],
                     "--data", data, "--output", str(tmp_path / "run"), "--template", "stratos", "--batch-size", "2",
                     "--max-steps", "1", "--num-samples", "0", "--no-progress",
                     "--state-cache-dir", str(tmp_path / "states"), *extra])

    assert train("--max-length", "5000") == 2  # beyond the small model's 1024 positions
    assert "--max-length" in one_error_line(capsys)
    assert not (tmp_path / "run" / RUN_CONFIG_FILE).exists()
    assert train("--batch-size", "64") == 2  # more than the training examples
    assert "fewer than one optimizer step" in one_error_line(capsys)
    real_fit = loop.fit

    def fails(run, on_step=None):
        raise KeyboardInterrupt  # interrupted after setup, before a first checkpoint

    monkeypatch.setattr(loop, "fit", fails)
    assert train("--max-length", "512") == 130
    assert (tmp_path / "run" / RUN_CONFIG_FILE).is_file()
    monkeypatch.setattr(loop, "fit", real_fit)
    assert train("--max-length", "512") == 0  # nothing was trained: no --resume needed
    assert (tmp_path / "run" / "last" / WEIGHTS_FILE).is_file()
    capsys.readouterr()
    assert train("--max-length", "512") == 2  # now it holds a trained run
    assert "--resume" in one_error_line(capsys)


# ----------------------------------------------------------------------------- item 17
def test_train_on_data_with_duplicate_records_then_another_split(tiny_pair_with_tokenizer, tmp_path):
    """Repeated records, then another --data-seed: the second state cache copies the states the first
    holds, duplicates included, and must save each as a tensor of its own."""
    lines = Path(write_data(tmp_path / "unique.jsonl")).read_text().splitlines()
    (tmp_path / "data.jsonl").write_text("\n".join(lines + lines[:5] + lines[2:4]) + "\n")  # 7 duplicates

    def train(output: str, *extra: str) -> int:
        return main(["train", "--large", tiny_pair_with_tokenizer["large"], "--small", tiny_pair_with_tokenizer["small"],
                     "--data", str(tmp_path / "data.jsonl"), "--output", str(tmp_path / output), "--template",
                     "stratos", "--batch-size", "2", "--max-length", "512", "--max-steps", "1", "--num-samples", "0",
                     "--no-progress", "--state-cache-dir", str(tmp_path / "states"), *extra])

    assert train("first") == 0
    assert train("second", "--data-seed", "3", "--val-fraction", "0.25") == 0


# ----------------------------------------------------------------------------- item 11
def test_eval_output_into_a_missing_folder_creates_it_and_prints_the_result(run_folder, tmp_path, capsys):
    output = tmp_path / "results" / "deeper" / "eval.json"
    assert main(["eval", "--model", str(run_folder), "--no-generate", "--output", str(output)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["loss"] > 0 and json.loads(output.read_text())["loss"] == printed["loss"]
    assert main(["eval", "--model", str(run_folder), "--no-generate", "--output", str(tmp_path)]) == 2
    assert "is a folder" in one_error_line(capsys)


# ----------------------------------------------------------------------------- item 12
def test_chat_outgrowing_the_context_drops_old_exchanges_and_goes_on(tiny_pair_with_tokenizer, tmp_path, capsys,
                                                                      monkeypatch):
    """A small model of 96 positions: the third exchange no longer fits with the first, which is dropped
    (one line says so); a message too long on its own is refused; the conversation goes on."""
    small = tmp_path / "small96"
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                 intermediate_size=64, vocab_size=90, max_position_embeddings=96)).save_pretrained(small)
    model = LLMModulesModel.compose(large=tiny_pair_with_tokenizer["large"], small=str(small), head="new")
    model.save_pretrained(tmp_path / "model")
    words = "one two three four five six seven eight nine ten " * 2  # 20 tokens
    said = iter([words, words, words, words * 6, "And now?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(said))
    assert main(["chat", "--model", str(tmp_path / "model"), "--system", "Be brief.", "--max-new-tokens", "8",
                 "--min-new-tokens", "8"]) == 0
    err = capsys.readouterr().err
    assert "dropped the oldest 1 exchange" in err and "message not sent" in err and "Traceback" not in err
    assert "error" not in err


def test_fit_conversation_drops_whole_exchanges_oldest_first():
    from llm_modules.entrypoints.chat import fit_conversation

    history = [{"role": r, "content": str(i)} for i, r in enumerate(["user", "assistant"] * 3 + ["user"])]
    render = lambda h: [0] * (10 * len(h))  # noqa: E731 (10 tokens a message)
    ids, dropped = fit_conversation(history, render, room=35)
    assert dropped == 2 and len(ids) == 30 and [m["content"] for m in history] == ["4", "5", "6"]
    assert fit_conversation([{"role": "user", "content": "x"}], render, room=5) == (None, 0)


# ----------------------------------------------------------------------------- item 13
@pytest.mark.parametrize("command", ["generate", "info", "serve"])
def test_a_corrupt_weights_file_is_one_line(run_folder, tmp_path, capsys, command):
    for content in (b"not safetensors at all", (run_folder / "best" / WEIGHTS_FILE).read_bytes()[:200]):
        broken = broken_copy(run_folder, tmp_path / str(len(content)), f"best/{WEIGHTS_FILE}", content)
        args = {"generate": ["--prompt", "hi", "--max-new-tokens", "1"], "info": [], "serve": ["--port", "0"]}[command]
        assert main([command, "--model", str(broken / "best"), *args]) == 2
        assert WEIGHTS_FILE in one_error_line(capsys)


@pytest.mark.parametrize("command", ["generate", "eval", "serve"])
def test_a_corrupt_run_config_is_one_line(run_folder, tmp_path, capsys, command):
    broken = broken_copy(run_folder, tmp_path, RUN_CONFIG_FILE, b'{"data": "x.jsonl", "templ')
    args = {"generate": ["--prompt", "hi", "--max-new-tokens", "1"], "eval": ["--no-generate"],
            "serve": ["--port", "0"]}[command]
    assert main([command, "--model", str(broken), *args]) == 2
    assert RUN_CONFIG_FILE in one_error_line(capsys)


@pytest.mark.parametrize("flag,value,said", [("--port", "99999", "--port"), ("--port", "-1", "--port"),
                                             ("--host", "no.such.host.invalid", "--host")])
def test_serve_checks_its_address_before_loading_the_model(run_folder, capsys, monkeypatch, flag, value, said):
    refuse_to_load(monkeypatch)
    assert main(["serve", "--model", str(run_folder), flag, value]) == 2
    assert said in one_error_line(capsys)


def test_serve_on_a_port_in_use_is_one_line_before_loading(run_folder, capsys, monkeypatch):
    import socket

    refuse_to_load(monkeypatch)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--model", str(run_folder), "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen" in one_error_line(capsys)


def test_a_yaml_syntax_error_in_train_config_is_one_line(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("max_steps: 2\ndata: [unclosed\nlarge: x\n")
    assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 2
    line = one_error_line(capsys)
    assert "run.yaml" in line and "line " in line


# ----------------------------------------------------------------------------- item 14
@pytest.mark.parametrize("value", ["0", "-5"])
def test_generate_with_no_new_tokens_is_one_line_before_loading(run_folder, capsys, monkeypatch, value):
    refuse_to_load(monkeypatch)
    assert main(["generate", "--model", str(run_folder), "--prompt", "hi", "--max-new-tokens", value]) == 2
    assert "--max-new-tokens must be >= 1" in one_error_line(capsys)
