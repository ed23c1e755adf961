"""Running a model one chunk of positions ahead with KV caches whose rows can be realigned, joined
and selected: what continuous batching (`llm_modules.decoding.engine`) needs from a model.

A `Stepper` wraps a plain Hugging Face causal LM (its own cache) or a model that supplies its own
(`decode_stepper()`: the composed model's three caches, `llm_modules.models.composed_stepper`), and lists every cached
tensor as a `Slot`: (B, nh, N, hs) whose N columns are the last ones of the S positions seen, right
aligned, so padding a cache on the left (zeros, masked) or cutting leading columns keeps each row's
keys where the attention mask says they are.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from llm_modules.errors import LLMModulesError
from llm_modules.tensors import positions_from_mask


class Decoder:
    """Calls a Hugging Face decoder (no LM head) with its KV cache, across transformers 5.x renames."""

    def __init__(self, module: nn.Module):
        self.module = module
        params = inspect.signature(module.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def __call__(self, cache: Any = None, use_cache: bool = False, **kwargs: Any) -> tuple[Any, Any]:
        out = self.module(**{self.cache_arg: cache}, use_cache=use_cache, **kwargs)
        new_cache = out.cache if hasattr(out, "cache") else getattr(out, "past_key_values", None)
        return out, (new_cache if use_cache else None)


@dataclass
class Slot:
    """One cached tensor (B, nh, N, hs) whose N columns are the last `cols(S)` of S positions
    (`per_position` columns each; a sliding-window layer keeps at most `window`). A `fixed` slot's N columns
    are not positions (a prompt in another tokenizer's ids, read whole by every position): realigning the
    positions leaves it as it is, and rows joining left-pad the narrower with zeros (`join_rows`)."""

    holder: Any
    key: Any  # attribute name, or list index
    per_position: int = 1
    window: int | None = None
    fixed: bool = False

    def get(self) -> torch.Tensor:
        return self.holder[self.key] if isinstance(self.key, int) else getattr(self.holder, self.key)

    def set(self, value: torch.Tensor) -> None:
        if isinstance(self.key, int):
            self.holder[self.key] = value
        else:
            setattr(self.holder, self.key, value)

    def cols(self, positions: int) -> int:
        n = positions * self.per_position
        return n if self.window is None else min(n, self.window)


def hf_slots(cache: Any) -> Iterator[Slot]:
    """The key/value tensors of a transformers DynamicCache (full or sliding-window layers)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise LLMModulesError(f"continuous batching needs a transformers DynamicCache, got {type(cache).__name__}")
    for layer in layers:
        if type(layer).__name__ not in ("DynamicLayer", "DynamicSlidingWindowLayer"):
            raise LLMModulesError(f"continuous batching does not support {type(layer).__name__} cache layers")
        window = layer.sliding_window - 1 if getattr(layer, "is_sliding", False) else None
        yield Slot(layer, "keys", window=window)
        yield Slot(layer, "values", window=window)


def set_hf_length(cache: Any, positions: int) -> None:
    for layer in cache.layers:
        if hasattr(layer, "cumulative_length"):  # sliding layers count every position seen
            layer.cumulative_length = positions


def right_aligned(t: torch.Tensor, cols: int) -> torch.Tensor:
    """Keep the last `cols` columns of (B, nh, N, hs), zero-filling on the left when there are fewer."""
    have = t.shape[2]
    if cols <= have:
        return t[:, :, have - cols:]
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], cols - have, t.shape[3]), t], dim=2)


def join_rows(slot: Slot, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The rows of `old` then those of `new` (B, nh, N, hs), a fixed slot's narrower one left-padded with zeros."""
    if slot.fixed and old.shape[2] != new.shape[2]:
        width = max(old.shape[2], new.shape[2])
        old, new = right_aligned(old, width), right_aligned(new, width)
    return torch.cat([old, new])


def align_rows(stepper: "Stepper", ids: torch.Tensor, mask: torch.Tensor, cache: Any, width: int, pad_id: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad (or cut leading padding from) ids, mask (B, S) and the cache's slots to `width` positions."""
    have = ids.shape[1]
    if width > have:
        ids = torch.cat([ids.new_full((ids.shape[0], width - have), pad_id), ids], 1)
        mask = torch.cat([mask.new_zeros((mask.shape[0], width - have)), mask], 1)
    else:
        ids, mask = ids[:, have - width:], mask[:, have - width:]
    if cache is not None and width != have:
        slots = stepper.slots(cache)  # read before the length changes (per-position counts)
        for slot in slots:
            if not slot.fixed:
                slot.set(right_aligned(slot.get(), slot.cols(width)))
        stepper.set_length(cache, width)
    return ids, mask


class Stepper:
    """Runs a model one chunk of positions ahead with a KV cache, and lists that cache's tensors."""

    def __init__(self, model: Any):
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, cache: Any, use_cache: bool) -> tuple[torch.Tensor, Any]:
        """ids (B, T), mask (B, S) over cached + new positions -> last-position logits (B, V) and the cache."""
        raise NotImplementedError

    def slots(self, cache: Any) -> list[Slot]:
        raise NotImplementedError

    def set_length(self, cache: Any, positions: int) -> None:
        raise NotImplementedError

    @property
    def max_positions(self) -> int | None:
        raise NotImplementedError


class PlainStepper(Stepper):
    """A Hugging Face causal LM (the baselines): its own KV cache; positions from the mask, as composed."""

    def __init__(self, model: Any):
        super().__init__(model)
        self.decoder = Decoder(model)
        # The last position's logits only: over a prompt, the LM head on every position costs T x |V|
        # (a 1,000-token prompt and 152k tokens: 0.6 GB of float32 logits and 0.5 TFLOP) for nothing. Asked
        # as a position index, not `logits_to_keep=1`: transformers then slices (B, 1, d) out of (B, T, d), a
        # non-contiguous view that this CPU's bfloat16 linear took 23 s for at batch 8 (a copy takes none).
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft passes it through
        self.keeps_logits = "logits_to_keep" in inspect.signature(inner.forward).parameters

    def forward(self, ids, mask, cache, use_cache):
        # only over several positions (a one-token step has nothing to drop); on the CPU: an index tensor
        # there serves hidden states on any device (a model spread over GPUs)
        t = ids.shape[1]
        last = {"logits_to_keep": torch.tensor([t - 1])} if self.keeps_logits and t > 1 else {}
        out, cache = self.decoder(cache=cache, use_cache=use_cache, input_ids=ids, attention_mask=mask,
                                  position_ids=positions_from_mask(mask)[:, -ids.shape[1]:], **last)
        return out.logits[:, -1], cache

    def slots(self, cache):
        return list(hf_slots(cache))

    def set_length(self, cache, positions):
        set_hf_length(cache, positions)

    @property
    def max_positions(self):
        return getattr(self.model.config, "max_position_embeddings", None)


def stepper_for(model: Any) -> Stepper:
    """The model's own stepper (`decode_stepper()`, e.g. the composed model's three caches), else a plain
    Hugging Face causal LM's."""
    own = getattr(model, "decode_stepper", None)
    return own() if callable(own) else PlainStepper(model)
