"""The evaluation harness: bits per byte, accuracy on every kind of answer, every sample kept."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from llm_modules.data.prepare import DataConfig, answer_bytes, prepare_data
from llm_modules.data.sources import load_records
from llm_modules.evaluation.harness import EvalOptions, evaluate, is_correct

from ..helpers import gpt2_tokenizer


@pytest.mark.parametrize("task", ["spell_backward", "family_relationships", "word_sorting"])
def test_plain_text_answers_are_judged_by_the_tasks_own_scorer(task):
    pytest.importorskip("reasoning_gym")
    records = load_records(f"reasoning-gym:{task}?size=4&seed=1")
    for record in records:
        example = SimpleNamespace(record=record)
        from llm_modules.data.answers import extract_final_answer

        right, wrong = record.reference, "definitely not it"
        assert is_correct(example, extract_final_answer(right), right) is True
        assert is_correct(example, extract_final_answer(f"  {right}\n"), f"  {right}\n") is True
        assert is_correct(example, extract_final_answer(wrong), wrong) is False


def test_a_short_answer_with_numbers_in_it_is_judged_whole():
    # number_sorting's answer is a list: the last-number rule alone would pick one element.
    pytest.importorskip("reasoning_gym")
    record = load_records("reasoning-gym:number_sorting?size=1&seed=1")[0]
    from llm_modules.data.answers import extract_final_answer

    text = record.reference
    assert extract_final_answer(text) != text
    assert is_correct(SimpleNamespace(record=record), extract_final_answer(text), text) is True


class ScriptedScorer:
    """A scorer whose generations are given texts and whose loss is a fixed NLL per answer token."""

    def __init__(self, tokenizer, answers: list[str], nll_per_token: float):
        self.tokenizer, self.answers, self.nll = tokenizer, iter(answers), nll_per_token
        self.device, self.max_positions = torch.device("cpu"), None

    def loss_sum(self, batch):
        return float((batch["labels"][:, 1:] != -100).sum()) * self.nll

    def generate(self, ids, mask, max_new_tokens):
        rows = [ids[i].tolist() + self.tokenizer(next(self.answers))["input_ids"] for i in range(ids.shape[0])]
        width = max(map(len, rows))
        return torch.tensor([r + [self.tokenizer.eos_token_id] * (width - len(r)) for r in rows])


def test_accuracy_equals_a_hand_count_of_every_kept_sample_and_bits_per_byte_is_per_answer_byte():
    pytest.importorskip("reasoning_gym")
    tokenizer = gpt2_tokenizer()
    data = prepare_data(DataConfig(spec="reasoning-gym:spell_backward?size=6&seed=3", template="stratos",
                                   val_fraction=0.0), tokenizer)
    examples = data.train
    # right, wrong, right with spaces around, wrong, right, empty
    answers = [e.record.reference if i % 2 == 0 else "nope" for i, e in enumerate(examples)]
    answers[2], answers[-1] = f"  {answers[2]} ", ""
    result = evaluate(ScriptedScorer(tokenizer, answers, 0.7), examples,
                      EvalOptions(split="all", batch_size=4, max_new_tokens=8, num_samples=-1))
    samples = result["samples"]
    assert len(samples) == len(examples) == 6
    hand = sum(s["model_answer"].strip() == s["reference"] for s in samples)
    assert result["correct"] == hand == 3 and result["accuracy"] == round(hand / 6, 4)
    assert [s["correct"] for s in samples] == [True, False, True, False, True, False]
    n_bytes = sum(len(e.record.messages[-1]["content"].encode()) for e in examples)
    assert result["answer_bytes"] == n_bytes == sum(answer_bytes(e.record) for e in examples)
    expected = result["answer_tokens"] * 0.7 / math.log(2) / n_bytes
    assert result["bits_per_byte"] == pytest.approx(expected, abs=1e-5)


def test_eval_cli_prints_bits_per_byte_for_a_plain_model(tiny_pair_with_tokenizer, tmp_path, capsys):
    from llm_modules.entrypoints.cli import main

    from ..helpers import write_data

    data = write_data(tmp_path / "d.jsonl", n=6)
    args = ["eval", "--model", tiny_pair_with_tokenizer["large"], "--data", data, "--template", "stratos",
            "--split", "all", "--no-generate"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bits_per_byte"] == pytest.approx(
        result["loss"] * result["answer_tokens"] / math.log(2) / result["answer_bytes"], rel=1e-4)
