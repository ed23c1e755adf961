"""Every baseline trains through the one loop (train.fit) as a model plus a loss, and evaluates
through the one harness: plain fine-tuning, LoRA, logit distillation."""

from __future__ import annotations

import json

import pytest
import torch

from llm_modules.errors import LLMModulesError
from llm_modules.evaluation.harness import EvalOptions, evaluate, load_scorer
from llm_modules.models.saved import PLAIN_FILE
from llm_modules.training.config import TrainConfig
from llm_modules.training.loop import train

from ..helpers import write_data


def plain_config(tmp_path, pair, method, **over):
    data = write_data(tmp_path / "data.jsonl", n=10)
    return TrainConfig.from_flags(**{
        "large": pair["large"], "small": pair["small"], "data": data, "output": str(tmp_path / method),
        "method": method, "template": "stratos", "max_length": 512, "batch_size": 4,
        "max_steps": 12, "lr_small": 3e-3, "lr_bridge": 3e-2, "val_fraction": 0.2, "eval_every": 4,
        "num_samples": 0, "progress": False, "early_stopping_patience": 0, **over})


def val_curve(output) -> list[float]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r["val_bpb"] for r in rows if "val_bpb" in r]


def test_finetuning_trains_every_weight_through_the_one_loop(tmp_path, tiny_pair_with_tokenizer):
    config = plain_config(tmp_path, tiny_pair_with_tokenizer, "finetune", small=tiny_pair_with_tokenizer["large"])
    summary = train(config)
    counts = summary["parameters"]["total"]
    assert summary["steps"] == 12 and counts["frozen"] == 0 and counts["trainable"] > 1_000_000
    curve = val_curve(tmp_path / "finetune")
    assert len(curve) == 4 and curve[-1] < curve[0]  # step 0, 4, 8, 12, in bits per byte
    # The saved folder is a model: safetensors of the trained weights + JSON, reloaded identically.
    best = tmp_path / "finetune" / "best"
    assert json.loads((best / PLAIN_FILE).read_text())["method"] == "finetune"
    scorer = load_scorer(str(best))
    from llm_modules.data.prepare import prepare_data

    data = prepare_data(config.data, scorer.tokenizer, None)
    result = evaluate(scorer, data.val, EvalOptions(max_new_tokens=2, num_samples=-1))
    assert result["bits_per_byte"] == pytest.approx(summary["best_val_bpb"], rel=1e-4)
    assert len(result["samples"]) == len(data.val)


def test_lora_trains_only_adapters_and_reloads(tmp_path, tiny_pair_with_tokenizer):
    pytest.importorskip("peft")
    summary = train(plain_config(tmp_path, tiny_pair_with_tokenizer, "lora", lora_rank=4))
    counts = summary["parameters"]["total"]
    assert 0 < counts["trainable"] < counts["frozen"] / 10
    # rank 4 on every linear layer of the 2-layer tiny Qwen2 (q, k, v, o, gate, up, down; width 32, ffn 64,
    # kv width 16): r * (in + out) per layer
    shapes = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)]
    assert counts["trainable"] == 2 * sum(4 * (i + o) for i, o in shapes)
    curve = val_curve(tmp_path / "lora")
    assert curve[-1] < curve[0]
    saved = load_scorer(str(tmp_path / "lora" / "best"))
    assert sum(p.numel() for p in saved.model.parameters()) == counts["trainable"] + counts["frozen"]


def test_distillation_student_reads_and_writes_the_large_vocabulary(tmp_path, tiny_pair_with_tokenizer):
    # this pair's small model has no tokenizer, so its student starts from random embeddings
    summary = train(plain_config(tmp_path, tiny_pair_with_tokenizer, "distill", distill_init="random"))
    rows = [json.loads(line) for line in (tmp_path / "distill" / "metrics.jsonl").read_text().splitlines()]
    kl = [r["loss"] for r in rows if "loss" in r]
    assert sum(kl[-3:]) < sum(kl[:3])  # trained by KL to the (random, tiny) teacher ...
    assert len(val_curve(tmp_path / "distill")) == 4  # ... validated by cross-entropy of the answers
    scorer = load_scorer(str(tmp_path / "distill" / "best"))
    model = scorer.model
    assert model.get_output_embeddings().weight.shape[0] == 50257
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert summary["parameters"]["total"]["trainable"] == sum(p.numel() for p in set(model.parameters()))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert model.generate(input_ids=ids, max_new_tokens=2, do_sample=False).shape == (1, 7)


@pytest.mark.parametrize("method", ["finetune", "lora", "distill"])
@pytest.mark.parametrize("option,value", [("train_small", False), ("head", "projected"), ("bridge", "ladder"),
                                          ("small_inputs", "mapped"), ("train_embeddings", True), ("causal", False),
                                          ("num_layers", 3), ("dropout", 0.0), ("large_layers", "1")])
def test_composition_options_are_refused_by_the_methods_that_do_not_compose(tmp_path, tiny_pair_with_tokenizer,
                                                                             method, option, value):
    """Silently ignoring them would train something other than what the command line says."""
    with pytest.raises(LLMModulesError, match=f"--{option.replace('_', '-')} shapes the composed model"):
        plain_config(tmp_path, tiny_pair_with_tokenizer, method, **{option: value})


def test_a_mapped_student_starts_as_the_small_model_reading_the_same_text(tmp_path, mapped_pair):
    """`--distill-init mapped` (the default): each large token's embedding is the mean of the small model's
    embeddings of its text's small pieces, so on tokens that are one small piece each the student's body computes
    exactly what the small model computes on the small tokenization of the same text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_modules.training.objectives import build_objective

    objective = build_objective(plain_config(tmp_path, mapped_pair, "distill"))
    student = objective.module.eval()
    assert objective.spec.student_init == "mapped"
    small = AutoModelForCausalLM.from_pretrained(mapped_pair["small"]).eval()
    large_tok, small_tok = AutoTokenizer.from_pretrained(mapped_pair["large"]), AutoTokenizer.from_pretrained(
        mapped_pair["small"])
    embed, small_embed = student.get_input_embeddings().weight, small.get_input_embeddings().weight
    one_piece, several = [], None
    for i in range(len(large_tok)):
        pieces = small_tok(large_tok.decode([i]), add_special_tokens=False)["input_ids"]
        if len(pieces) == 1:
            one_piece.append((i, pieces[0]))
        elif len(pieces) > 1 and several is None:
            several = (i, pieces)
    assert len(one_piece) >= 12 and several is not None
    i, pieces = several
    torch.testing.assert_close(embed[i], small_embed[pieces].mean(0), rtol=0, atol=1e-6)
    large_ids = torch.tensor([[a for a, _ in one_piece[:12]]])
    small_ids = torch.tensor([[b for _, b in one_piece[:12]]])
    with torch.no_grad():
        ours = student.model(input_ids=large_ids).last_hidden_state
        theirs = small.model(input_ids=small_ids).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert student.get_output_embeddings().weight is embed  # the head reads the same rows
    random = build_objective(plain_config(tmp_path, mapped_pair, "distill", distill_init="random"))
    assert not torch.allclose(random.module.get_input_embeddings().weight[i], embed[i])
    # saved and loaded: the trained rows come back, the map is not recomputed
    objective.save_pretrained(tmp_path / "saved")
    from llm_modules.models.plain import load_plain

    loaded, _ = load_plain(tmp_path / "saved")
    torch.testing.assert_close(loaded.get_input_embeddings().weight, embed, rtol=0, atol=0)


def test_a_mapped_student_needs_the_small_tokenizer(tmp_path, mapped_pair):
    from llm_modules.training.objectives import build_objective

    with pytest.raises(LLMModulesError, match="mapped student needs both tokenizers: none found for .*small_no_tokenizer.*--distill-init random"):
        build_objective(plain_config(tmp_path, mapped_pair, "distill", small=mapped_pair["small_no_tokenizer"]))
