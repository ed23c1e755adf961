"""The frozen large side: calling its decoder with a KV cache, taking hidden states at the taps the
bridge and head read, and standing in for the parts freed while training from cached states."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .errors import LLMModulesError


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


class Released(nn.Module):
    """Stands where a part of the large model was freed by `LLMModulesModel.release_large`."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise LLMModulesError(
            "this part of the large model was released to save memory while training from cached states; "
            "call restore_large() before running the large model"
        )


def num_layers(model: nn.Module) -> int:
    """Decoder layers of a Hugging Face causal LM (its hidden-state indices run 0..this)."""
    return model.config.get_text_config().num_hidden_layers


def tapped_states(decoder: Decoder, taps: list[int], last: int, cache: Any = None, use_cache: bool = False,
                  **inputs: Any) -> tuple[torch.Tensor, Any]:
    """Hidden states at `taps` (indices as in `output_hidden_states`; `last` = the final, normed one),
    stacked (B, T, K, dL) in tap order, and the decoder's new KV cache."""
    inner = any(t != last for t in taps)  # only then keep every layer's states
    out, new_cache = decoder(cache=cache, use_cache=use_cache, output_hidden_states=inner, **inputs)
    states = [out.last_hidden_state if t == last else out.hidden_states[t] for t in taps]  # K x (B, T, dL)
    return torch.stack(states, dim=2), new_cache  # (B, T, K, dL)
