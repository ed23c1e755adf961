"""`--data self-prompts:N`: prompts the large model writes from its chat template's user-turn opening (Magpie),
kept batch by batch, resumed to the same prompts, filtered (cut, empty, repeated); and the drafter's recipe that
`train --method drafter --large SPEC --output DIR` runs with no other option."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_modules.data.sources import load_records
from llm_modules.devices import best_device, half_where_native
from llm_modules.entrypoints.cli import build_parser, main, train_config_from_args
from llm_modules.errors import LLMModulesError
from llm_modules.training import self_prompts
from llm_modules.training.config import TrainConfig, option_default
from llm_modules.training.objectives.drafter import read_seen_prompts
from llm_modules.training.objectives.options import DrafterOptions

from ..helpers import build_chat_pair

ENDS = list(range(0, 50257, 4))  # a quarter of the vocabulary ends a turn: the tiny model's rows end quickly


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny chat pair whose large model ends a row at any of ENDS (its generation config's eos ids)."""
    root = tmp_path_factory.mktemp("self_prompts")
    folders = build_chat_pair(root)
    large = AutoModelForCausalLM.from_pretrained(folders["large"])
    large.generation_config.eos_token_id = ENDS
    large.save_pretrained(folders["large"])
    return folders


@pytest.fixture(scope="module")
def loaded(pair):
    return AutoModelForCausalLM.from_pretrained(pair["large"]).eval(), AutoTokenizer.from_pretrained(pair["large"])


def test_the_spec_parses_and_refuses_in_one_line():
    assert self_prompts.parse_spec("self-prompts:12?seed=3&max_tokens=8&top_p=0.9") == (
        12, {"seed": 3, "max_tokens": 8, "temperature": 1.0, "top_p": 0.9})
    for bad, words in (("self-prompts:0", "count"), ("self-prompts:x", "count"), ("self-prompts:4?foo=1", "foo"),
                       ("self-prompts:4?seed=a", "seed"), ("self-prompts:4?temperature=0", "temperature")):
        with pytest.raises(LLMModulesError, match=words):
            self_prompts.parse_spec(bad)
    with pytest.raises(LLMModulesError, match="--method drafter"):
        load_records("self-prompts:4")


def test_the_opening_is_the_template_up_to_the_users_text(loaded):
    _, tokenizer = loaded
    opening = tokenizer.decode(self_prompts.user_turn_opening(tokenizer))
    assert opening == "<|user|>"  # tests/helpers.py's CHAT_TEMPLATE: no system prompt of its own
    bare = SimpleNamespace(chat_template=None)
    with pytest.raises(LLMModulesError, match="no chat template"):
        self_prompts.user_turn_opening(bare)


def _records(root, loaded, spec):
    large, tokenizer = loaded
    return self_prompts.self_prompt_records(large, tokenizer, "tiny", spec, root)


def test_prompts_are_sampled_filtered_kept_and_read_back(tmp_path, loaded):
    spec = "self-prompts:20?seed=1&max_tokens=6"
    records, report = _records(tmp_path, loaded, spec)
    assert report["asked"] == 20
    assert report["kept"] + report["empty"] + report["repeated"] == 20 and report["cut_at_max_tokens"] > 0
    assert report["kept"] == len(records) > 0 and report["empty"] > 0  # ENDS covers a quarter of the ids
    texts = [r.messages[0]["content"] for r in records]
    assert len(set(texts)) == len(texts) and all(t and t == t.strip() for t in texts)
    assert all(r.messages[1] == {"role": "assistant", "content": ""} for r in records)
    written = json.loads(Path(report["file"]).read_text())["answers"]
    assert len(written) == 20 and all(len(w) <= 6 for w in written)
    again, _ = _records(tmp_path, loaded, spec)  # read from the file
    assert [r.messages for r in again] == [r.messages for r in records]
    other, _ = _records(tmp_path / "other", loaded, "self-prompts:20?seed=2&max_tokens=6")
    assert [r.messages for r in other] != [r.messages for r in records]  # the seed decides them


def test_a_killed_sampling_resumes_to_the_same_prompts(tmp_path, loaded, monkeypatch):
    monkeypatch.setattr(self_prompts, "GENERATE_BATCH", 4)
    spec = "self-prompts:12?seed=7&max_tokens=5"
    straight, _ = _records(tmp_path / "straight", loaded, spec)
    real, calls = self_prompts.generate, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(self_prompts, "generate", dying)
    with pytest.raises(KeyboardInterrupt):
        _records(tmp_path / "resumed", loaded, spec)
    monkeypatch.setattr(self_prompts, "generate", real)
    calls["n"] = 0
    resumed, _ = _records(tmp_path / "resumed", loaded, spec)
    assert [r.messages for r in resumed] == [r.messages for r in straight]


def test_the_drafter_recipe_applies_where_nothing_is_given():
    config = TrainConfig.from_flags(method="drafter", large="l", output="o")
    recipe = DrafterOptions.run_defaults
    assert config.small == recipe["small"] and config.data.spec == recipe["data"]
    assert config.method_options.drafter_targets == "generated" and config.method_options.draft_vocab == 8192
    # its large model in bfloat16 where this machine computes in it natively, else float32 (`--large-dtype auto`)
    native = half_where_native(best_device())
    assert (config.compose.small_layers, config.hardware.large_dtype, config.train.lr_small) == (2, native, 1e-3)
    given = TrainConfig.from_flags(method="drafter", large="l", output="o", data="d.jsonl", draft_vocab=0,
                                   drafter_targets="logits", small_layers=3)
    assert (given.data.spec, given.method_options.draft_vocab, given.compose.small_layers) == ("d.jsonl", 0, 3)
    composed = TrainConfig.from_flags(large="l", small="s", data="d", output="o", max_steps=1)
    assert composed.hardware.large_dtype == "float32" and composed.compose.small_layers is None  # its own defaults
    assert option_default("draft_vocab", "drafter") == 8192 and option_default("large_dtype") == "float32"
    with pytest.raises(LLMModulesError, match="--drafter-targets generated"):
        TrainConfig.from_flags(method="drafter", large="l", output="o", drafter_targets="logits")
    args = build_parser().parse_args(["train", "--method", "drafter", "--large", "l", "--output", "o"])
    assert train_config_from_args(args).data.spec == recipe["data"]  # no --data asked for


def test_a_drafter_trains_on_self_prompts_end_to_end(tmp_path, pair, capsys):
    args = ["train", "--method", "drafter", "--large", pair["large"], "--small", pair["small"], "--output",
            str(tmp_path / "run"), "--data", "self-prompts:24?seed=0&max_tokens=5", "--max-length", "24",
            "--large-dtype", "float32", "--batch-size", "2", "--max-steps", "2", "--epochs", "0", "--val-fraction",
            "0.2", "--large-layers", "1,2", "--draft-vocab", "64", "--no-progress",
            "--state-cache-dir", str(tmp_path / "states")]
    assert main(args) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    report = summary["self_prompts"]
    assert report["asked"] == 24 and report["kept"] == summary["target_generation"]["examples"] > 0
    assert Path(report["file"]).parent == tmp_path / "self_prompts"
    assert summary["drafter"]["vocab"] >= len(ENDS)  # the end ids are always in it
    assert "self-prompts:" in capsys.readouterr().out
    seen = (tmp_path / "run" / "self_prompts.jsonl").read_text().splitlines()  # what the drafter saw, kept with it
    assert len(seen) == report["kept"] and all(json.loads(line)["prompt"] for line in seen)
    # read back from the saved drafter (the run folder above it) as benchmarks' leak checks read it
    assert read_seen_prompts(tmp_path / "run" / "last") == [json.loads(line)["prompt"] for line in seen]
    assert read_seen_prompts(tmp_path) is None


def test_a_run_interrupted_before_its_first_step_reruns_with_the_same_command(tmp_path, pair, monkeypatch):
    """The folder gets the seen prompts with the run's config, not before: a run killed while the target answers
    (after its own prompts were written) is rerun by repeating the command, not refused as someone else's folder."""
    from llm_modules.training import generated

    args = ["train", "--method", "drafter", "--large", pair["large"], "--small", pair["small"], "--output",
            str(tmp_path / "run"), "--data", "self-prompts:8?seed=1&max_tokens=5", "--max-length", "24",
            "--large-dtype", "float32", "--batch-size", "2", "--max-steps", "1", "--epochs", "0", "--val-fraction",
            "0.25", "--large-layers", "1,2", "--draft-vocab", "64", "--no-progress",
            "--state-cache-dir", str(tmp_path / "states")]
    real = generated.answer_batch

    def dying(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(generated, "answer_batch", dying)
    assert main(args) == 130  # interrupted: the CLI's exit code for Ctrl-C
    run = tmp_path / "run"
    assert not run.exists() or not [p.name for p in run.iterdir() if p.name != "run.lock"]
    monkeypatch.setattr(generated, "answer_batch", real)
    assert main(args) == 0
    assert (tmp_path / "run" / "self_prompts.jsonl").is_file() and (tmp_path / "run" / "last").is_dir()


def test_a_draft_vocabulary_is_filled_with_the_lowest_ids_when_answers_hold_too_few():
    from llm_modules.decoding.speculative.composed_proposer import draft_vocabulary

    answers = [[50, 51, 51, 52], [52, 52, 99]]
    assert draft_vocabulary(answers, 3, always=[7]).tolist() == [7, 50, 51, 52]  # the most frequent (ties: lower id)
    assert draft_vocabulary(answers, 6, always=[7]).tolist() == [7, 50, 51, 52, 99]  # no vocab_size: no filling
    assert draft_vocabulary(answers, 6, always=[7], vocab_size=1000).tolist() == [0, 1, 7, 50, 51, 52, 99]
    assert draft_vocabulary(answers, 9, vocab_size=3).tolist() == [0, 1, 2, 50, 51, 52, 99]  # ids run out
