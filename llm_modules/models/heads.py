"""Heads that turn the small model's output into logits: over the LARGE model's vocabulary, or (kind "own") over
the small model's own."""

from __future__ import annotations

import torch
from torch import nn


class ComposedHead(nn.Module):
    """Logits over the large vocabulary (the small model's own, kind "own") from the small model's last hidden states.

    kind "new":       logits = W s, W a fresh (|V_large|, d_small) matrix (the paper's head).
    kind "projected": logits = large_head(U s), U a trainable (d_large, d_small) projection and
                      large_head the large model's frozen output embedding.
    kind "residual":  logits = large_head(h + U s) = large logits + large_head(U s), U
                      zero-initialised, so an untrained model predicts exactly what the large
                      model predicts (proxy-tuning's idea).
    kind "own":       logits = the small model's own language head (`own`, its pretrained output layer, maybe
                      tied to its input embeddings) over the SMALL vocabulary.
    The large model's output embedding is passed in at call time, never owned (nor saved) here.
    """

    def __init__(self, kind: str, small_dim: int, large_dim: int, vocab_size: int, own: nn.Module | None = None):
        super().__init__()
        self.kind = kind
        if kind == "own":
            if own is None:
                raise ValueError("the own head needs the small model's output layer")
            self.out = own
        elif kind == "new":
            self.out = nn.Linear(small_dim, vocab_size, bias=False)
        else:
            self.up = nn.Linear(small_dim, large_dim, bias=False)
            if kind == "residual":
                nn.init.zeros_(self.up.weight)

    def forward(self, s: torch.Tensor, h: torch.Tensor | None, large_head: nn.Module,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """s (B, T, dS) small output; h (B, T, dL) large final states -> logits (B, T, |V_large|).

        `rows` (n,): logits of those vocabulary entries only (B, T, n), for a drafter that drafts from a
        smaller vocabulary (EAGLE-3's); the slice of the output weights is kept while the same rows come."""
        if rows is not None:
            if self.kind in ("residual", "own"):
                raise ValueError(f"the {self.kind} head has no vocabulary subset of the large model's")
            weight = self._rows_weight(rows, self.out.weight if self.kind == "new" else large_head.weight)
            x = s if self.kind == "new" else self.up(s)
            return torch.nn.functional.linear(x.to(weight.device, weight.dtype), weight).to(s.device, s.dtype)
        if self.kind in ("new", "own"):
            return self.out(s)
        x = self.up(s)  # (B, T, dL)
        if self.kind == "residual":
            x = h.to(x.device, x.dtype) + x
        weight = large_head.weight  # frozen, maybe on another device (a device map) and in another precision
        return large_head(x.to(weight.device, weight.dtype)).to(s.device, s.dtype)

    def _rows_weight(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        key = (rows.data_ptr(), rows.numel(), weight.data_ptr())
        if getattr(self, "_rows_key", None) != key:
            self._rows_key = key
            self._rows_value = weight.detach()[rows.to(weight.device)]  # (n, d)
        return self._rows_value
