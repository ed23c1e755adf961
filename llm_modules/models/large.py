"""The frozen large side: calling its decoder with a KV cache, taking hidden states at the taps the
bridge and head read, and standing in for the parts freed while training from cached states."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llm_modules.decoding.steppers import Decoder, PlainStepper, Slot, hf_slots, set_hf_length
from llm_modules.errors import LLMModulesError
from llm_modules.tensors import DTYPES, positions_from_mask


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


def input_device(model: nn.Module) -> torch.device | None:
    """Where `model` takes its token ids: its input embeddings' device. With a device map the layers
    may be spread over several GPUs, and a single-device map adds no hooks that move inputs there."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return embeddings.weight.device if embeddings is not None else None


def tapped_states(decoder: Decoder, taps: list[int], last: int, cache: Any = None, use_cache: bool = False,
                  **inputs: Any) -> tuple[torch.Tensor, Any]:
    """Hidden states at `taps` (indices as in `output_hidden_states`; `last` = the final, normed one),
    stacked (B, T, K, dL) in tap order on the device of the given `input_ids`, and the decoder's new KV
    cache. The inputs go to the large model's own input device first (it may sit on other GPUs)."""
    out_device = inputs["input_ids"].device
    to = input_device(decoder.module)
    if to is not None:  # None: a released large model, which raises its own error below
        inputs = {k: v.to(to) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    inner = any(t != last for t in taps)  # only then keep every layer's states
    out, new_cache = decoder(cache=cache, use_cache=use_cache, output_hidden_states=inner, **inputs)
    # K x (B, T, dL), each from whichever device its layer ran on
    states = [(out.last_hidden_state if t == last else out.hidden_states[t]).to(out_device) for t in taps]
    return torch.stack(states, dim=2), new_cache  # (B, T, K, dL)


class TappedCache:
    """A large model's KV cache (`kv`) and its hidden states at the taps of every position it has read
    (`states`, (B, K, N, dL), right-aligned like the keys: a `Slot` of the cache)."""

    def __init__(self, kv: Any, states: torch.Tensor):
        self.kv, self.states = kv, states


class TappedStepper(PlainStepper):
    """A Hugging Face causal LM stepped as `PlainStepper` steps it, keeping its hidden states at `taps` (indices
    as in `tapped_states`) of every position it reads, in `dtype`, as one more slot of its cache: rows join,
    leave and realign with their keys and values. What generating a drafter's training answers needs to keep
    the states its state cache would otherwise compute in a second pass over the same tokens."""

    def __init__(self, model: Any, taps: list[int], dtype: torch.dtype = torch.float32):
        super().__init__(model)
        self.base = Decoder(model.base_model)
        self.head = model.get_output_embeddings()
        self.last, self.taps, self.dtype = num_layers(model), list(taps), dtype
        self.reads = self.taps if self.last in self.taps else self.taps + [self.last]  # the logits need the last

    def forward(self, ids, mask, cache, use_cache):
        states, kv = tapped_states(self.base, self.reads, self.last, cache=None if cache is None else cache.kv,
                                   use_cache=True, input_ids=ids, attention_mask=mask,
                                   position_ids=positions_from_mask(mask)[:, -ids.shape[1]:])  # (B, T, K', dL)
        logits = self.head(states[:, -1, self.reads.index(self.last)])  # (B, V)
        new = states[:, :, : len(self.taps)].transpose(1, 2).to(self.dtype)  # (B, K, T, dL)
        return logits, TappedCache(kv, new if cache is None else torch.cat([cache.states, new], 2))

    def slots(self, cache):
        return list(hf_slots(cache.kv)) + [Slot(cache, "states")]

    def set_length(self, cache, positions):
        set_hf_length(cache.kv, positions)


# ----------------------------------------------------------------------------- loading
DEVICE_MAPS = ("none", "auto")
QUANTIZATIONS = ("none", "8bit", "4bit")


def load_options(dtype: str = "float32", device_map: str = "none", quantization: str = "none",
                 device: torch.device | str = "cpu", processes: int = 1) -> dict[str, Any]:
    """`from_pretrained` arguments that place or quantize the frozen large model while it loads.

    device_map "auto": accelerate's big-model loading spreads the layers over the GPUs this process
    may use, then the CPU: every GPU of the node with one process; only this process's GPU (and
    its share of the CPU memory) with several, since each process holds its own copy. "none":
    loaded on the CPU and moved whole to `device` (`LLMModulesModel.place`). Quantization goes
    through bitsandbytes (a CUDA GPU), onto this process's GPU unless a device map says otherwise.
    An empty dict: nothing to do while loading.
    """
    for name, value, allowed in (("--large-dtype", dtype, tuple(DTYPES)), ("--large-device-map", device_map,
                                 DEVICE_MAPS), ("--large-quantization", quantization, QUANTIZATIONS)):
        if value not in allowed:
            raise LLMModulesError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    device = torch.device(device)
    options: dict[str, Any] = {}
    if quantization != "none":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise LLMModulesError(f"--large-quantization {quantization} needs bitsandbytes, which is not installed "
                                  "(pip install 'llm-modules[quantization]'; it runs on CUDA GPUs)")
        if device.type != "cuda":
            raise LLMModulesError(f"--large-quantization {quantization} needs a CUDA GPU (bitsandbytes); this "
                                  f"process runs on {device}")
        from transformers import BitsAndBytesConfig

        options["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True) if quantization == "8bit" else
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=DTYPES[dtype]))
        options["device_map"] = {"": device}
    if device_map == "auto":
        options["device_map"] = "auto"
        if processes > 1 and device.type == "cuda":
            import os

            free, _ = torch.cuda.mem_get_info(device)
            cpu = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") // processes
            options["max_memory"] = {device.index or 0: int(free * 0.9), "cpu": int(cpu * 0.9)}
    return options


def is_placed(model: nn.Module) -> bool:
    """Whether `model` was placed while loading (device map or quantization): it must not be moved whole."""
    return getattr(model, "hf_device_map", None) is not None or bool(getattr(model, "is_quantized", False))


def quantization_of(model: nn.Module) -> str:
    """'8bit', '4bit' or 'none': how `model`'s weights were quantized while loading."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return "none"
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    return "8bit" if get("load_in_8bit", False) else "4bit" if get("load_in_4bit", False) else "none"
