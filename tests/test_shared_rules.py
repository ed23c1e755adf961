"""Rules that generate, chat, eval and serve share, each written once: which model loads (plain ones
too), which prompt template a model takes, and how sampling keywords become one SamplingOptions."""

from __future__ import annotations

import json

import pytest
import torch

from llm_modules.data.prompting import choose_template
from llm_modules.decoding.generation import generate
from llm_modules.decoding.sampling import SamplingOptions
from llm_modules.entrypoints.cli import main
from llm_modules.errors import LLMModulesError
from llm_modules.models.loading import load_model
from llm_modules.models.saved import RUN_CONFIG_FILE
from llm_modules.tensors import left_pad, right_pad


def test_generate_and_chat_run_a_plain_model_spec(tiny_pair_with_tokenizer, capsys, monkeypatch):
    spec = tiny_pair_with_tokenizer["large"]  # a plain causal LM folder with tokenizer files (a baseline)
    loaded = load_model(spec)
    assert not loaded.composed and not loaded.model.training and loaded.tokenizer is not None
    capsys.readouterr()
    assert main(["generate", "--model", spec, "--prompt", "Once upon a time", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    ids = loaded.tokenizer("Once upon a time", return_tensors="pt").input_ids  # raw: no run, no chat template
    expected = generate(loaded.model, ids, max_new_tokens=5, tokenizer=loaded.tokenizer)[0, ids.shape[1]:]
    assert printed.strip() == loaded.tokenizer.decode(expected, skip_special_tokens=True).strip()
    answers = iter(["Hello there", ""])
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))
    assert main(["chat", "--model", spec, "--max-new-tokens", "3"]) == 0


def test_one_rule_picks_the_prompt_template(tmp_path):
    plain, chatty = type("Plain", (), {"chat_template": None})(), type("Chatty", (), {"chat_template": "{{ x }}"})()
    model = tmp_path / "run" / "best"
    model.mkdir(parents=True)
    assert choose_template(str(model), plain) == "stratos"
    assert choose_template(str(model), plain, "auto", fallback="raw") == "raw"
    assert choose_template(str(model), chatty) == "chat"
    (tmp_path / "run" / RUN_CONFIG_FILE).write_text(json.dumps({"template": "stratos"}))
    assert choose_template(str(model), chatty) == "stratos"  # the training run's template wins
    assert choose_template(str(model), chatty, "chat") == "chat"  # a given one wins over all


def test_sampling_keywords_become_one_object():
    base = SamplingOptions(max_new_tokens=5, seed=3)
    assert base.updated(eos_token_id=7, top_p=0.5) == SamplingOptions(max_new_tokens=5, seed=3, top_p=0.5,
                                                                      eos_token_ids=[7])
    assert base.updated(eos_token_id=[]).eos_token_ids == []
    assert base.updated(eos_token_id=None).eos_token_ids is None
    with pytest.raises(TypeError, match="top_q"):
        base.updated(top_q=0.5)
    with pytest.raises(LLMModulesError, match="top_p must be in"):
        base.updated(top_p=0.0)
    assert torch.equal(torch.rand(4, generator=base.generator()), torch.rand(4, generator=base.generator()))
    assert SamplingOptions().generator() is None


def test_token_lists_pad_on_either_side():
    ids, mask = left_pad([[1, 2, 3], [4]], pad=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = right_pad([[1, 2, 3], [4]], pad=-1)
    assert ids.tolist() == [[1, 2, 3], [4, -1, -1]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_the_last_positions_come_back_densely_laid_out():
    """`last_positions` gives standard strides also where `.contiguous()` keeps a view (batch 1: the size-1 batch
    dim still strides T * d, which made this CPU's bfloat16 head 80x slower), and copies nothing it need not."""
    import torch

    from llm_modules.tensors import last_positions

    t = torch.randn(1, 7, 4)
    assert t[:, -1:].contiguous().stride() == (28, 4, 1)  # what `.contiguous()` leaves
    for n in (1, 3):
        out = last_positions(t, n)
        assert out.stride() == (4 * n, 4, 1) and torch.equal(out, t[:, -n:])
    wide = torch.randn(3, 5, 4)
    assert last_positions(wide, 2).stride() == (8, 4, 1) and torch.equal(last_positions(wide, 2), wide[:, -2:])
    assert last_positions(wide, 5).data_ptr() == wide.data_ptr()  # already standard: the same tensor
