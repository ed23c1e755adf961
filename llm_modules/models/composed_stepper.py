"""How the decoding engine steps the composed model: its KV caches (the large model's, the bridge's
cross-attention keys/values, the small model's) listed as slots the engine can realign, join and select.

A model that reads the prompt only (`large_reads="prompt"`) keeps no large-model cache: the large model
runs once per row, over its prompt, when the row joins; every later step runs the bridge and the small
model alone (as a Whisper decoder reads its encoder's output, computed once per request).

A model with the own head (`head="own"`) decodes in the small tokenizer's ids: the large model reads each row's
prompt once, re-tokenized into its own ids (a sequence of its own length), and the bridge's keys over that
prompt are cached as slots whose columns are the large prompt's positions, not the small side's (`Slot.fixed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llm_modules.bridges import BridgeCache, LargeRead, LargeView
from llm_modules.decoding.steppers import Slot, Stepper, hf_slots, set_hf_length
from llm_modules.tensors import positions_from_mask


@dataclass
class ComposedCache:
    """Decoding caches of the three stages; the attention mask is the caller's, kept outside."""

    large: Any = None
    bridge: BridgeCache | None = None
    small: Any = None
    length: int = 0  # positions seen so far
    prompt: PromptRead | LargePrompt | None = None  # large_reads "prompt": what decoding keeps of each row's prompt


class ComposedStepper(Stepper):
    """The composed model: the large model's, the bridge's and the small model's caches."""

    def forward(self, ids, mask, cache, use_cache):
        if cache is None and use_cache:
            cache = ComposedCache()
        out = self.model(input_ids=ids, attention_mask=mask, cache=cache, logits_to_keep=1)
        return out.logits[:, -1], out.cache

    def slots(self, cache):
        positions = cache.length
        found = [slot for part in (cache.large, cache.small) if part is not None for slot in hf_slots(part)]
        if cache.bridge is not None:
            for entries in (cache.bridge.keys, cache.bridge.values):
                # eca: one column per position; xattn: one per position and tap (position-major)
                found += [Slot(entries, i, per_position=t.shape[2] // positions) for i, t in enumerate(entries)]
        if cache.prompt is not None:
            found += cache.prompt.slots()
        return found

    def set_length(self, cache, positions):
        cache.length = positions
        for part in (cache.large, cache.small):
            if part is not None:
                set_hf_length(part, positions)

    @property
    def max_positions(self):
        return self.model.max_positions


@dataclass
class PromptRead:
    """What decoding keeps of each row's prompt when the model reads the prompt only, as two more slots
    that the engine realigns, joins and selects with the rest.

    mask (B, 1, S, 1): 1 at the row's prompt positions, the ones with real large states (right-aligned like
    every cache, so left padding and cut columns keep it true). last (B, Kb, 1, dL): the large model's
    states in the bridge's taps at the row's last prompt position, which every answer position reads.
    """

    mask: torch.Tensor
    last: torch.Tensor

    def slots(self) -> list[Slot]:
        return [Slot(self, "mask"), Slot(self, "last", window=1)]  # `last`: one column whatever the length

    def read_mask(self, positions: int) -> torch.Tensor:
        """(B, S) 1 at prompt positions, 0 at padding and at the positions after the prompt."""
        seen = self.mask[:, 0, :, 0]  # (B, S_seen)
        return torch.cat([seen, seen.new_zeros(seen.shape[0], positions - seen.shape[1])], dim=1)


class PromptReadStepper(ComposedStepper):
    """A composed model that reads the prompt only: the first call on a row (its prompt) runs the large
    model without keeping its cache; every later call runs the bridge and the small model, each new
    position reading the prompt's states (its bridge keys are zeros that no position reads). With
    use_cache=False each call recomputes every position from scratch, the large model over the prompt."""

    def forward(self, ids, mask, cache, use_cache):
        model = self.model
        if cache is None:
            return self._prefill(ids, mask, use_cache)
        reads = cache.prompt.read_mask(mask.shape[1])  # (B, S)
        last = reads.shape[1] - 1 - reads.flip(1).argmax(dim=1)  # (B,) each row's last prompt position
        if not use_cache:
            out = model.forward_read(LargeRead(answer_start=last + 1), input_ids=ids, attention_mask=mask,
                                     logits_to_keep=1)
        else:
            b, t = ids.shape
            view = LargeView(last[:, None].expand(b, t),  # (B, T)
                             cache.prompt.last.transpose(1, 2).expand(b, t, -1, -1))  # (B, T, Kb, dL)
            unread = torch.zeros(b, t, len(model.large_taps), model.bridge.shape.large_dim,
                                 dtype=cache.prompt.last.dtype, device=model.device)  # (B, T, K, dL)
            out = model.forward_read(LargeRead(view=view, mask=reads), input_ids=ids, attention_mask=mask,
                                     large_states=unread, cache=cache, logits_to_keep=1)
            cache = out.cache
        cache.prompt.mask = reads[:, None, :, None]  # (B, 1, S, 1)
        return out.logits[:, -1], cache

    def _prefill(self, ids, mask, use_cache):
        """ids, mask (B, S): left-padded prompts, every position of them read by the large model once."""
        model = self.model
        states, _ = model.encode_large(ids, mask, positions_from_mask(mask))  # (B, S, K, dL), no cache kept
        out = model.forward_read(LargeRead(answer_start=ids.shape[1]), input_ids=ids, attention_mask=mask,
                                 large_states=states, cache=ComposedCache() if use_cache else None, logits_to_keep=1)
        cache = out.cache if use_cache else ComposedCache()  # without KV caches: the prompt's bounds only
        last = states[:, -1:, model.bridge_taps].to(model.device, model.small.dtype)  # (B, 1, Kb, dL): prompts end right
        cache.prompt = PromptRead(mask=mask[:, None, :, None], last=last.transpose(1, 2).contiguous())
        return out.logits[:, -1], cache


@dataclass
class LargePrompt:
    """What decoding keeps of each row's prompt in the large tokenizer's ids (head "own"), as slots whose columns
    are that prompt's positions (`Slot.fixed`).

    ids, mask (B, 1, P, 1): the prompt's large-tokenizer ids (read again when every step recomputes) and its 0/1
    mask. last (B, Kb, 1, dL): the bridge taps' large states at the row's last prompt position, which every
    small position reads where a bridge reads one state (ladder).
    """

    ids: torch.Tensor
    mask: torch.Tensor
    last: torch.Tensor

    def slots(self) -> list[Slot]:
        return [Slot(self, name, fixed=True) for name in ("ids", "mask", "last")]

    @property
    def key_mask(self) -> torch.Tensor:
        return self.mask[:, 0, :, 0]  # (B, P)


def last_real(mask: torch.Tensor) -> torch.Tensor:
    """(B, P) 0/1 mask -> (B,) each row's last real position."""
    return mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)


class OwnHeadStepper(ComposedStepper):
    """A composed model with the own head: it decodes the small tokenizer's ids. The first call on a row (its
    prompt) re-tokenizes the prompt for the large model (`large_prompt`) and runs it once, without keeping its
    cache; every later call runs the bridge and the small model alone, each new position reading the whole
    prompt's states (the bridge's keys over it, cached). With use_cache=False each call recomputes every
    position from scratch, the large model over the prompt's large ids."""

    def forward(self, ids, mask, cache, use_cache):
        model = self.model
        if cache is None:
            return self._prefill(ids, mask, use_cache)
        prompt = cache.prompt
        key_mask = prompt.key_mask  # (B, P)
        if not use_cache:
            states, _ = model.encode_large(prompt.ids[:, 0, :, 0], key_mask, positions_from_mask(key_mask))
            out = model.forward_read(LargeRead(mask=key_mask), input_ids=ids, attention_mask=mask, large_states=states,
                                     logits_to_keep=1)
            return out.logits[:, -1], cache
        b, t = ids.shape
        view = LargeView(last_real(key_mask)[:, None].expand(b, t),  # (B, T)
                         prompt.last.transpose(1, 2).expand(b, t, -1, -1))  # (B, T, Kb, dL)
        added = prompt.last.new_zeros(b, 0, len(model.large_taps), model.bridge.shape.large_dim)  # (B, 0, K, dL)
        out = model.forward_read(LargeRead(view=view, mask=key_mask), input_ids=ids, attention_mask=mask,
                                 large_states=added, cache=cache, logits_to_keep=1)
        return out.logits[:, -1], out.cache

    def _prefill(self, ids, mask, use_cache):
        """ids, mask (B, S): left-padded prompts in the small tokenizer's ids, each read by the large model once."""
        model = self.model
        large_ids, key_mask = model.large_prompt(ids, mask, ids.shape[1])  # (B, P) each
        states, _ = model.encode_large(large_ids, key_mask, positions_from_mask(key_mask))  # (B, P, K, dL)
        out = model.forward_read(LargeRead(mask=key_mask), input_ids=ids, attention_mask=mask, large_states=states,
                                 cache=ComposedCache() if use_cache else None, logits_to_keep=1)
        cache = out.cache if use_cache else ComposedCache()  # without KV caches: the prompt alone
        rows = torch.arange(ids.shape[0], device=states.device)
        last = states[rows, last_real(key_mask).to(states.device)][:, model.bridge_taps]  # (B, Kb, dL)
        cache.prompt = LargePrompt(ids=large_ids[:, None, :, None], mask=key_mask[:, None, :, None],
                                   last=last[:, :, None].to(model.device, model.small.dtype))
        return out.logits[:, -1], cache

    def slots(self, cache):
        found = list(hf_slots(cache.small)) if cache.small is not None else []
        if cache.bridge is not None:  # xattn's keys/values over the large prompt's positions
            found += [Slot(entries, i, fixed=True) for entries in (cache.bridge.keys, cache.bridge.values)
                      for i in range(len(entries))]
        return found + cache.prompt.slots()
