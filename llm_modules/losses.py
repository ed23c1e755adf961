"""The one loss: next-token cross-entropy, shifted by one position, over the positions whose label counts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llm_modules.tensors import IGNORE_INDEX


def answer_logit_targets(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, V) at the positions that predict a counted label, and those labels (N,): position t
    predicts labels[t + 1]. Any per-position tensor (B, T, ...) works in place of logits (the composed
    model picks its hidden states this way before running the head)."""
    targets = labels[:, 1:].to(logits.device)  # (B, T-1)
    keep = targets != IGNORE_INDEX
    return logits[:, :-1][keep], targets[keep]


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting labels[t + 1] from position t, in float32; IGNORE_INDEX labels are skipped.
    logits (B, T, V), labels (B, T); reduction "mean" (over counted labels), "sum" or "none"."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def answer_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over counted labels (the one loss every method reports); the
    vocabulary-wide float32 copy is made of those positions only."""
    picked, targets = answer_logit_targets(logits, labels)
    return F.cross_entropy(picked.float(), targets, reduction="sum")
