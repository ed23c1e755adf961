"""Classic logit distillation, the baseline a user would otherwise reach for.

The student is the small model's pretrained body with new token embeddings and a new (tied) LM
head over the LARGE vocabulary, so it reads and writes the large tokenizer's ids exactly like the
composed model's small part; it is trained to match the large model's next-token distribution
(forward KL, temperature T) on the answer tokens, the large model computing its logits on the fly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .baselines import PlainRun, run_steps
from .data import DataConfig, prepare_data
from .errors import LLMModulesError


def build_student(small: nn.Module, large: nn.Module, tokenizer) -> nn.Module:
    """Replace the small model's vocabulary with the large one's (new, tied embeddings)."""
    vocab = large.get_output_embeddings().weight.shape[0]
    width = small.get_input_embeddings().weight.shape[1]
    embed = nn.Embedding(vocab, width)
    nn.init.normal_(embed.weight, std=getattr(small.config, "initializer_range", 0.02))
    small.set_input_embeddings(embed)
    head = nn.Linear(width, vocab, bias=False)
    head.weight = embed.weight
    small.set_output_embeddings(head)
    small.config.vocab_size = vocab
    small.config.tie_word_embeddings = True
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(large.generation_config, name, None) or getattr(tokenizer, name, None)
        setattr(small.config, name, value)
        setattr(small.generation_config, name, value)
    return small


def distill(
    large_spec: str, small_spec: str, data: DataConfig, epochs: int = 1, max_steps: int = 0, batch_size: int = 4,
    lr: float = 5e-5, embed_lr: float = 1e-3, temperature: float = 1.0, seed: int = 0, max_grad_norm: float = 1.0,
) -> PlainRun:
    """Train a large-vocabulary student by KL to the frozen large model; returns it ready for evaluation."""
    from .specs import resolve_model

    torch.manual_seed(seed)
    large = resolve_model(large_spec)
    if large.tokenizer is None:
        raise LLMModulesError(f"model {large_spec!r} has no tokenizer; distillation needs one")
    teacher, tokenizer = large.model.eval().requires_grad_(False), large.tokenizer
    student = build_student(resolve_model(small_spec, with_tokenizer=False).model, teacher, tokenizer).train()
    prepared = prepare_data(data, tokenizer, getattr(student.config, "max_position_embeddings", None))
    embed = student.get_input_embeddings().weight
    body = [p for p in student.parameters() if p.requires_grad and p is not embed]
    optimizer = torch.optim.AdamW([{"params": body, "lr": lr}, {"params": [embed], "lr": embed_lr}], weight_decay=0.01)
    params = body + [embed]

    def step(batch: dict[str, torch.Tensor]) -> float:
        keep = batch["labels"][:, 1:] != -100  # (B, T-1) answer positions
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            target = teacher(**inputs).logits[:, :-1][keep].float() / temperature  # (N, V)
        logits = student(**inputs).logits[:, :-1][keep].float() / temperature
        loss = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target, -1), log_target=True,
                        reduction="batchmean") * temperature**2
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    steps, losses, seconds = run_steps(prepared, tokenizer, batch_size, seed, epochs, max_steps, step)
    student.eval()
    trainable = sum(p.numel() for p in set(student.parameters()) if p.requires_grad)
    return PlainRun(student, tokenizer, prepared, steps, seconds, trainable, losses)
