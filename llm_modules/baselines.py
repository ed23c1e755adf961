"""Baselines trained through the same data pipeline: a plain causal LM fine-tuned alone, or with LoRA.

Same examples (rendered by the model's own tokenizer and the same template), same batching
(length-grouped, seeded), same answer-only loss, same optimizer family, so the comparison with a
composed model differs only in the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .data import DataConfig, PreparedData, collate, length_grouped_batches, pad_id, prepare_data
from .errors import LLMModulesError


@dataclass
class PlainRun:
    model: Any
    tokenizer: Any
    data: PreparedData
    steps: int
    seconds: float
    trainable: int
    losses: list[float]


def answer_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over answer tokens, and their count."""
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    targets = labels[:, 1:]
    keep = targets != -100
    loss = F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum")
    return loss, int(keep.sum())


def finetune_plain(
    spec: str, data: DataConfig, epochs: int = 1, max_steps: int = 0, batch_size: int = 4, lr: float = 5e-5,
    lora_rank: int = 0, seed: int = 0, max_grad_norm: float = 1.0,
) -> PlainRun:
    """Fine-tune a plain model spec on `data` (all weights, or LoRA adapters when lora_rank > 0)."""
    from .specs import resolve_model

    torch.manual_seed(seed)
    loaded = resolve_model(spec)
    model, tokenizer = loaded.model, loaded.tokenizer
    if tokenizer is None:
        raise LLMModulesError(f"model {spec!r} has no tokenizer; fine-tuning it needs one")
    if lora_rank:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise LLMModulesError("LoRA baselines need peft: pip install 'llm-modules[eval]'") from None
        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    prepared = prepare_data(data, tokenizer, getattr(model.config, "max_position_embeddings", None))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def step(batch: dict[str, torch.Tensor]) -> float:
        loss, count = answer_loss(model, batch)
        (loss / count).backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()) / count

    model.train()
    steps, losses, seconds = run_steps(prepared, tokenizer, batch_size, seed, epochs, max_steps, step)
    model.eval()
    return PlainRun(model, tokenizer, prepared, steps, seconds, sum(p.numel() for p in params), losses)


def run_steps(
    prepared: PreparedData, tokenizer: Any, batch_size: int, seed: int, epochs: int, max_steps: int,
    step: Callable[[dict[str, torch.Tensor]], float],
) -> tuple[int, list[float], float]:
    """Feed length-grouped, seeded batches of the training split to `step` for `epochs` or `max_steps`."""
    pad = pad_id(tokenizer)
    lengths = [len(e.input_ids) for e in prepared.train]
    losses: list[float] = []
    started = time.perf_counter()
    epoch = 0
    while (max_steps and len(losses) < max_steps) or (not max_steps and epoch < epochs):
        for indices in length_grouped_batches(lengths, batch_size, seed, epoch):
            losses.append(step(collate([prepared.train[i] for i in indices], pad)))
            if max_steps and len(losses) >= max_steps:
                break
        epoch += 1
    return len(losses), losses, time.perf_counter() - started
