"""Which device and precision `generate`, `chat` and `eval` run on: `--device` and `--dtype`."""

from __future__ import annotations

import torch

from llm_modules.errors import LLMModulesError
from llm_modules.tensors import DTYPES

DTYPE_CHOICES = ("auto", *DTYPES)


def best_device() -> torch.device:
    """A CUDA GPU when there is one, else Apple's mps, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_device(name: str = "auto") -> torch.device:
    """`--device`: auto (the best available), cpu, cuda, cuda:N or mps; one that is absent is an error."""
    if name == "auto":
        return best_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise LLMModulesError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}") from None
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise LLMModulesError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPUs")
    if device.type == "mps" and best_device().type != "mps":
        raise LLMModulesError(f"--device {name}: mps is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise LLMModulesError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`--dtype`: auto is bfloat16 on a CUDA GPU that has it (half the memory, its fast path), else float32."""
    if name not in DTYPE_CHOICES:
        raise LLMModulesError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]
