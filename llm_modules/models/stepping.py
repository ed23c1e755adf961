"""How the decoding engine steps the composed model: its three KV caches (the large model's, the bridge's
cross-attention keys/values, the small model's) listed as slots the engine can realign, join and select."""

from __future__ import annotations

from llm_modules.decoding.steppers import Slot, Stepper, hf_slots, set_hf_length


class ComposedStepper(Stepper):
    """The composed model: the large model's, the bridge's and the small model's caches."""

    def forward(self, ids, mask, cache, use_cache):
        out = self.model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=use_cache, logits_to_keep=1)
        return out.logits[:, -1], out.cache

    def slots(self, cache):
        positions = cache.length
        found = [*(hf_slots(cache.large) if cache.large is not None else ()), *hf_slots(cache.small)]  # a drafter keeps no large cache
        for entries in (cache.bridge.keys, cache.bridge.values):
            # eca: one column per position; xattn: one per position and tap (position-major)
            found += [Slot(entries, i, per_position=t.shape[2] // positions) for i, t in enumerate(entries)]
        return found

    def set_length(self, cache, positions):
        cache.length = positions
        if cache.large is not None:
            set_hf_length(cache.large, positions)
        set_hf_length(cache.small, positions)

    @property
    def max_positions(self):
        return self.model.max_positions
