"""Baselines go through the same data pipeline and harness: plain fine-tuning, LoRA, logit distillation."""

from __future__ import annotations

import pytest
import torch

from llm_modules.baselines import finetune_plain
from llm_modules.data import DataConfig
from llm_modules.distill import distill
from llm_modules.evaluate import EvalOptions, PlainScorer, evaluate

from .test_train import write_data


@pytest.fixture
def data(tmp_path):
    return DataConfig(spec=write_data(tmp_path / "data.jsonl", n=8), template="stratos", max_length=512)


def test_plain_finetuning_lowers_the_answer_loss(tiny_pair_with_tokenizer, data):
    run = finetune_plain(tiny_pair_with_tokenizer["large"], data, max_steps=12, batch_size=4, lr=3e-3)
    assert run.steps == 12 and run.trainable == sum(p.numel() for p in run.model.parameters())
    assert sum(run.losses[-3:]) < sum(run.losses[:3])
    result = evaluate(PlainScorer(run.model, run.tokenizer), run.data.val, EvalOptions(max_new_tokens=3))
    assert result["loss"] > 0 and "accuracy" in result


def test_lora_trains_only_adapters(tiny_pair_with_tokenizer, data):
    pytest.importorskip("peft")
    run = finetune_plain(tiny_pair_with_tokenizer["large"], data, max_steps=4, batch_size=4, lr=1e-2, lora_rank=4)
    total = sum(p.numel() for p in run.model.parameters())
    assert 0 < run.trainable < total / 10


def test_distillation_student_reads_and_writes_the_large_vocabulary(tiny_pair_with_tokenizer, data):
    run = distill(tiny_pair_with_tokenizer["large"], tiny_pair_with_tokenizer["small"], data, max_steps=10,
                  batch_size=4, lr=3e-3, embed_lr=3e-2)
    assert run.model.get_output_embeddings().weight.shape[0] == 50257
    assert run.model.get_output_embeddings().weight is run.model.get_input_embeddings().weight
    assert sum(run.losses[-3:]) < sum(run.losses[:3])
    ids = torch.tensor([run.data.train[0].input_ids[:5]])
    assert run.model.generate(input_ids=ids, max_new_tokens=2, do_sample=False).shape == (1, 7)
