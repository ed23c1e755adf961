"""Which drafts a row keeps: greedy rows the prefix the target agrees with; sampled rows by the standard rule
(Leviathan et al. 2023; Chen et al. 2023), whose output follows the target's distribution."""

from __future__ import annotations

import torch


def accept_sampled(drafts: torch.Tensor, q: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None
                   ) -> tuple[int, int]:
    """One row's speculative sampling. drafts (K,) tokens drawn from q (K, V); p (K + 1, V) the target's
    probabilities at each draft and after the last. Returns (accepted count a, the row's next token):
    the first a drafts are kept and the next token follows them."""
    k = drafts.shape[0]
    for i in range(k):
        token = int(drafts[i])
        ratio = (p[i, token] / q[i, token].clamp_min(1e-30)).clamp(max=1.0)
        if float(torch.rand((), generator=generator)) < float(ratio):
            continue
        residual = (p[i] - q[i]).clamp_min(0)
        total = residual.sum()
        if not total > 0:  # p == q up to rounding: any draw from p is the residual's
            residual, total = p[i], p[i].sum()
        return i, int(torch.multinomial(residual / total, 1, generator=generator))
    return k, int(torch.multinomial(p[k], 1, generator=generator))


def accept_greedy(drafts: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    """drafts (K,), target (K + 1,) the target's own choices at each draft and after the last ->
    (accepted count a, the target's next token after them)."""
    agree = (drafts == target[:-1]).long()
    a = int(agree.cumprod(0).sum())
    return a, int(target[a])
