"""The target of speculative decoding: a causal LM stepped over first + K drafts at once, and the rollback of its
caches past the drafts it rejected."""

from __future__ import annotations

from typing import Any

import torch

from llm_modules.decoding.steppers import Decoder, PlainStepper, Slot, right_aligned
from llm_modules.errors import LLMModulesError
from llm_modules.tensors import positions_from_mask


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
        inner = any(t != self.layers for t in self.taps)
        out, cache = self.body(cache=cache, use_cache=True, input_ids=ids, attention_mask=mask,
                               position_ids=positions_from_mask(mask)[:, -ids.shape[1]:], output_hidden_states=inner)
        last = out.last_hidden_state  # (B, T, dL)
        states = None
        if self.taps:
            states = torch.stack([last if t == self.layers else out.hidden_states[t] for t in self.taps], 2)
        # contiguous: a strided (B, n, dL) view into the head was 500x slower in bfloat16 on this CPU
        return self.head(last[:, -logits_to_keep:].contiguous() if logits_to_keep else last), states, cache


def shift_right(t: torch.Tensor, shifts: torch.Tensor, dim: int) -> torch.Tensor:
    """Move row b of `t` (rows on dim 0) right by shifts[b] along `dim`, zeros coming in on the left and
    the last shifts[b] entries falling off. One copy of the tensor, row by row (slices, no index tensor:
    a gather over a batch's whole KV cache cost ~50 ms a verify pass at batch 8)."""
    if not bool(shifts.any()):
        return t
    width, axis = t.shape[dim], dim - 1  # `dim` of `t` is `axis` of a row
    rows = []
    for row, s in zip(t.unbind(0), shifts.tolist()):
        s = min(int(s), width)
        if s:
            zeros = row.new_zeros(row.shape[:axis] + (s,) + row.shape[axis + 1:])
            row = torch.cat([zeros, row.narrow(axis, 0, width - s)], axis)
        rows.append(row)
    return torch.stack(rows)


def drop_last(slots: list[Slot], drop: torch.Tensor, positions_after: int) -> None:
    """Roll each row's cached tensors back by drop[b] positions: the last min(drop) columns go from every
    row, then row b moves right by drop[b] - min(drop) (its newest keys fall off; zeros, masked, come
    in on the left). `positions_after`: the positions the batch spans afterwards."""
    common = int(drop.min())
    for slot in slots:
        if slot.window is not None:
            raise LLMModulesError("speculative decoding cannot roll back a sliding-window cache")
        t = slot.get()  # (B, nh, N, hs)
        t = t[:, :, : t.shape[2] - common * slot.per_position]
        slot.set(right_aligned(shift_right(t, (drop - common) * slot.per_position, 2), slot.cols(positions_after)))
