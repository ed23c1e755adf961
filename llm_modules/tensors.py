"""Small tensor rules every layer shares, each written once: the label that means "no loss here", position
ids from a padding mask, left padding of token lists, and the names of the floating-point dtypes."""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100  # a label position that no loss counts (prompts, padding); PyTorch's cross-entropy default
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def last_positions(t: torch.Tensor, n: int) -> torch.Tensor:
    """The last n positions of t (B, T, d) as a tensor with the standard strides. Not `.contiguous()`: a slice
    whose other dims have size 1 counts as contiguous and comes back as it is, its batch dim still striding
    T * d, and this CPU's bfloat16 linear over such a (1, 1, d) input, with weights that need no gradient, took
    2 s for a 151,936-row head against 25 ms over the same values laid out densely."""
    part = t[:, -n:]
    standard, step = [], 1
    for size in reversed(part.shape):
        standard.insert(0, step)
        step *= size
    return part if tuple(part.stride()) == tuple(standard) else part.clone(memory_format=torch.contiguous_format)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) 0/1 mask -> (B, S) position ids counting real tokens only, so padding changes nothing."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(rows: list[list[int]], pad: int, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (B, W) ids and 0/1 mask, each row ending at the right edge."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def right_pad(rows: list[list[int]], pad: int, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (B, W) ids and 0/1 mask, each row starting at the left edge."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids.to(device), mask.to(device)


def lagged_source(lag: torch.Tensor | int, batch: int, length: int, device: Any = None) -> torch.Tensor:
    """(B, T) source indices t - lag (-1 where that falls before the sequence): position t reads the large
    states up to t - lag only. `lag` an int, or (B,) per row, or (B, T) per position."""
    positions = torch.arange(length, device=device)[None, :]  # (1, T)
    lag = torch.as_tensor(lag, device=device)
    lag = lag[:, None] if lag.dim() == 1 else lag
    source = (positions - lag).expand(batch, length)
    return torch.where(source >= 0, source, -1).long()


def draft_source(offset: torch.Tensor | int, block: int, batch: int, length: int, device: Any = None) -> torch.Tensor:
    """(B, T) sources of a drafter's training: the positions fall in blocks of `block` (K, the draft length),
    the first block of row b ending at position offset[b] (0 <= offset < K), and every position of a block
    reads the states up to the position just before the block: what a drafter has while it drafts K tokens
    after the last verified one (the first of them reads one state behind, the last K behind)."""
    positions = torch.arange(length, device=device)[None, :]  # (1, T)
    offset = torch.as_tensor(offset, device=device).reshape(-1, 1)  # (B or 1, 1)
    start = torch.div(positions - offset - 1, block, rounding_mode="floor") * block + offset + 1  # block's first position
    source = (start - 1).expand(batch, length)
    return torch.where(source >= 0, source, -1).long()


def answer_start(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B,) index of each row's first labelled position (IGNORE_INDEX elsewhere): where its
    answer starts, the prompt being everything before (T for a row without labels)."""
    labelled = labels != IGNORE_INDEX  # (B, T)
    first = labelled.long().argmax(dim=1)  # (B,): the first True, or 0 when there is none
    return torch.where(labelled.any(dim=1), first, labels.shape[1])


def prompt_source(start: torch.Tensor | int, batch: int, length: int, device: Any = None) -> torch.Tensor:
    """(B, T) sources of a decoder that reads the prompt only: position t reads the large states up to
    min(t, start - 1), `start` (an int or (B,)) being the index where each row's answer starts."""
    positions = torch.arange(length, device=device)[None, :]  # (1, T)
    start = torch.as_tensor(start, device=device).reshape(-1, 1)  # (B or 1, 1)
    return torch.minimum(positions, start - 1).expand(batch, length).long()
