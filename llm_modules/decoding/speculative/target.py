"""The target of speculative decoding: a causal LM stepped over first + K drafts at once, and the rollback of its
caches past the drafts it rejected."""

from __future__ import annotations

from typing import Any

import torch

from llm_modules.decoding.steppers import Decoder, PlainStepper, Slot
from llm_modules.errors import LLMModulesError
from llm_modules.tensors import last_positions, positions_from_mask


class TargetStepper(PlainStepper):
    """A Hugging Face causal LM as a speculative target: every position's logits, and its hidden states
    at the drafter's taps."""

    def __init__(self, model: Any, taps: list[int]):
        super().__init__(model)
        self.body = Decoder(model.base_model)
        self.head = model.get_output_embeddings()
        self.taps = list(taps)
        self.layers = model.config.get_text_config().num_hidden_layers

    def run(self, ids: torch.Tensor, mask: torch.Tensor, cache: Any, logits_to_keep: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """ids (B, T), mask (B, S) -> logits (B, T, V) (the last `logits_to_keep` positions' when > 0),
        states (B, T, K, dL) at the taps (None without), cache."""
        last, states, cache = self._forward(ids, mask, positions_from_mask(mask)[:, -ids.shape[1]:], cache)
        # densely laid out: a strided (B, n, dL) view into the head was 80-500x slower in bfloat16 on this CPU
        return self.head(last_positions(last, logits_to_keep) if logits_to_keep else last), states, cache

    def _forward(self, ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, cache: Any
                 ) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """-> the final states (B, T, dL), the states at the taps (B, T, K, dL) or None, the cache."""
        inner = any(t != self.layers for t in self.taps)
        out, cache = self.body(cache=cache, use_cache=True, input_ids=ids, attention_mask=attention_mask,
                               position_ids=positions, output_hidden_states=inner)
        last = out.last_hidden_state
        states = None
        if self.taps:
            states = torch.stack([last if t == self.layers else out.hidden_states[t] for t in self.taps], 2)
        return last, states, cache

    def run_tree(self, ids: torch.Tensor, ancestors: torch.Tensor, depths: torch.Tensor, mask: torch.Tensor,
                 cache: Any) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """A verify pass over draft trees: ids (B, N) the nodes, ancestors (B, N, N) bool (node i reads node j),
        depths (B, N), mask (B, S) the cached positions -> logits (B, N, V), states (B, N, K, dL), the cache
        with the N nodes appended. Node i sits at position (the row's real positions) + depth i and reads
        the row's cache and its own path only."""
        first = next(self.model.parameters())
        n = ids.shape[1]
        reads = torch.cat([mask.bool()[:, None, :].expand(-1, n, -1), ancestors.to(mask.device)], 2)  # (B, N, S + N)
        bias = torch.zeros(reads.shape, dtype=first.dtype, device=first.device)
        bias.masked_fill_(~reads.to(first.device), torch.finfo(first.dtype).min)
        positions = mask.long().sum(1, keepdim=True) + depths.to(mask.device)  # (B, N)
        last, states, cache = self._forward(ids, bias[:, None], positions, cache)
        return self.head(last), states, cache


def gather_columns(t: torch.Tensor, dim: int, index: torch.Tensor, per_position: int = 1) -> torch.Tensor:
    """Per row, the columns `index` (B, L) names along `dim` of `t` (rows on dim 0), in that order; each
    index a position of `per_position` columns -> a new tensor with L x per_position columns on `dim`, laid
    out densely. (Whole columns are copied: `torch.gather` over an expanded index took 1.4x as long at 8 rows
    and 1.8x at 16 to close the holes of a 1.5B-sized cache here.)"""
    rows = index.shape[0]
    cols = (index[:, :, None] * per_position + torch.arange(per_position, device=index.device)).reshape(rows, -1)
    picked = t.movedim(dim, 1)[torch.arange(rows, device=t.device)[:, None], cols.to(t.device)]  # (B, L, ...)
    return picked.movedim(1, dim).contiguous()


def kept_span(paths: list[list[int]]) -> int:
    """The node columns a rollback keeps: up to the last kept node of any row."""
    return max(path[-1] for path in paths) + 1


def keep_paths(t: torch.Tensor, dim: int, past: int, paths: list[list[int]], per_position: int = 1) -> torch.Tensor:
    """After a verify pass: `t` holds, along `dim` (rows on dim 0), `past` columns and then one column group
    per tree node (`per_position` columns each). Every row keeps its past and the node columns up to the last
    kept node of any row (`kept_span`), where they are: a node it did not keep is a hole, which the caller's
    mask (`path_mask`) marks as padding. Nothing moves (a view): a node's cached keys were made at its
    position (the row's real positions + its depth), which is what the mask's count of real columns gives it
    once the nodes before it that are off its path are masked. Right-aligning every row instead copied the
    whole KV cache, 11-23 ms a pass at batch 8 to 16 here. Holes add up over passes; the batch closes them
    now and then (`close_holes`)."""
    return t.narrow(dim, 0, past + kept_span(paths) * per_position)


def path_mask(paths: list[list[int]], like: torch.Tensor) -> torch.Tensor:
    """The mask's columns for the nodes `keep_paths` keeps: (B, kept_span), 1 on each row's path, 0 on the
    rest (holes)."""
    mask = torch.zeros((len(paths), kept_span(paths)), dtype=like.dtype, device=like.device)
    for b, path in enumerate(paths):
        mask[b, path] = 1
    return mask


def keep_cache_paths(slots: list[Slot], past: int, paths: list[list[int]]) -> None:
    """Roll each row's cached tensors back to its past and its kept path (`keep_paths` on every slot)."""
    for slot in slots:
        if slot.window is not None:
            raise LLMModulesError("speculative decoding cannot roll back a sliding-window cache")
        if not slot.fixed:
            slot.set(keep_paths(slot.get(), 2, past * slot.per_position, paths, slot.per_position))


def close_holes(mask: torch.Tensor) -> torch.Tensor | None:
    """The columns each row keeps when its holes close (B, W), W the most real columns of a row: its real
    columns (mask 1) in order, right-aligned, after as many of its padding columns as it lacks (still masked:
    the new mask is `mask.gather(1, index)`); None when the batch is that narrow already."""
    real = mask.long().sum(1)
    width = int(real.max())
    if width == mask.shape[1]:
        return None
    order = torch.argsort(mask.long(), dim=1, stable=True)  # padding first, then the real columns in order
    return order[:, mask.shape[1] - width:]
