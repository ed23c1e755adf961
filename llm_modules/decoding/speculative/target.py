"""The target of speculative decoding: a causal LM stepped over first + K drafts at once, and the rollback of its
caches past the drafts it rejected."""

from __future__ import annotations

from typing import Any

import torch

from llm_modules.decoding.steppers import Decoder, PlainStepper, Slot, right_aligned
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


def keep_paths(t: torch.Tensor, dim: int, past: int, paths: list[list[int]], per_position: int = 1) -> torch.Tensor:
    """After a verify pass: `t` holds, along `dim` (rows on dim 0), `past` columns and then one column group
    per tree node (`per_position` columns each). Row b keeps its past and the nodes of paths[b], in order;
    shorter paths are left-padded with zeros (masked), so every row stays right-aligned. One copy of the
    rows, slices where a path is the first nodes in order (a chain's: no index tensor, which over a batch's
    KV cache cost ~50 ms a pass at batch 8)."""
    longest = max(len(path) for path in paths)
    prefix = [path == list(range(len(path))) for path in paths]
    if all(prefix) and all(len(path) == longest for path in paths):
        return t.narrow(dim, 0, past + longest * per_position)
    axis = dim - 1  # `dim` of `t` is `axis` of a row
    rows = []
    for row, path, contiguous in zip(t.unbind(0), paths, prefix):
        kept = row.narrow(axis, 0, past + (len(path) * per_position if contiguous else 0))
        parts = [kept]
        if not contiguous:
            cols = torch.tensor([past + n * per_position + j for n in path for j in range(per_position)],
                                device=row.device)
            parts.append(row.index_select(axis, cols))
        missing = (longest - len(path)) * per_position
        if missing:
            parts.insert(0, row.new_zeros(row.shape[:axis] + (missing,) + row.shape[axis + 1:]))
        rows.append(torch.cat(parts, axis) if len(parts) > 1 else kept)
    return torch.stack(rows)


def keep_cache_paths(slots: list[Slot], past: int, paths: list[list[int]], positions_after: int) -> None:
    """Roll each row's cached tensors back to its past and its kept path (`keep_paths` on every slot). Nothing to
    do when every row kept all the pass's nodes in order (a plain step's one node, above all): ~5 ms of Python a
    pass over a 28-layer cache at batch 16 otherwise."""
    longest = max(len(path) for path in paths)
    if positions_after == past + longest and all(path == list(range(longest)) for path in paths):
        if all(slot.window is None and slot.get().shape[2] == slot.cols(positions_after) for slot in slots):
            return
    for slot in slots:
        if slot.window is not None:
            raise LLMModulesError("speculative decoding cannot roll back a sliding-window cache")
        t = keep_paths(slot.get(), 2, past * slot.per_position, paths, slot.per_position)  # (B, nh, N, hs)
        slot.set(right_aligned(t, slot.cols(positions_after)))
