"""Which device and precision `generate`, `chat` and `eval` run on: `--device` and `--dtype`; whether this machine
computes in bfloat16 natively (`native_bfloat16`, training's `--large-dtype auto`)."""

from __future__ import annotations

from pathlib import Path

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


# CPU flags (Linux's /proc/cpuinfo) of instructions that multiply bfloat16 matrices: x86's AVX512-BF16 and AMX,
# Arm's BF16 (listed as "bf16" in its Features line)
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_value(keys: tuple[str, ...], cpuinfo: Path | None = None) -> str | None:
    """The value of the first line of `cpuinfo` (default CPUINFO) whose key is one of `keys` (lower case); None where
    there is no such line or no such file."""
    try:
        text = (cpuinfo or CPUINFO).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in keys:
            return value.strip()
    return None


def cpu_flags(cpuinfo: Path | None = None) -> set[str]:
    """The CPU's feature flags, from its "flags" (x86) or "Features" (Arm) line; empty where unknown."""
    return set((cpuinfo_value(("flags", "features"), cpuinfo) or "").split())


def cpu_model(cpuinfo: Path | None = None) -> str:
    """The CPU's model name (x86's "model name" line), else the platform's processor string, else "unknown CPU"."""
    import platform

    return cpuinfo_value(("model name",), cpuinfo) or platform.processor() or "unknown CPU"


def native_bfloat16(device: torch.device | str = "cpu") -> bool:
    """Whether `device` computes in bfloat16 natively: a CUDA GPU that supports it, or a CPU with bfloat16 matrix
    instructions. Elsewhere torch emulates it: on an AVX2-only CPU here (AMD EPYC, 1 thread) a (1, 1536) x
    (1536, 8960) product took 24 ms in bfloat16 against 2.8 ms in float32, and 645 ms against 21 ms over 32 rows."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(cpu_flags() & BF16_FLAGS)


def half_where_native(device: torch.device | str = "cpu") -> str:
    """`--large-dtype auto`: "bfloat16" where `device` computes in it natively (half the bytes a step reads), else
    "float32"."""
    return "bfloat16" if native_bfloat16(device) else "float32"


def machine_description() -> str:
    """What a timing ran on, for reports: the GPU's name, else the CPU's architecture and model and whether it
    computes in bfloat16 natively (a verify pass over a few tokens costs about one step where it does, several
    where it does not: reports/speculative/pass_cost_avx2)."""
    import platform

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name()}"
    bf16 = "native bfloat16" if native_bfloat16() else "no bfloat16 instructions"
    return f"{platform.machine()} CPU ({cpu_model()}, {bf16})"
