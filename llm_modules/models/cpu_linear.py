"""Which kernel a float32 model's linear layers run on a CPU when decoding (`--cpu-linear`): torch's default (a BLAS
call, MKL in the x86 wheels), oneDNN's, or oneDNN's with ours for 2 to 16 rows (avx2: `models.small_m`).

Why it matters: MKL takes a slow path on AMD CPUs. On an AMD EPYC (AVX2, 2 threads) a (M, 1536) x (1536, 8960)
float32 product took 3.5 ms at M = 1 and 10-14 ms at M = 3 to 8 through torch's linear, against 2.0 ms and
3.2-4.8 ms through oneDNN's; a whole decode step of Qwen2.5-Coder-1.5B-Instruct 377 ms against 255 ms, a pass
over 8 tokens 1198 ms against 526 ms (reports/speculative/pass_cost_onednn; `benchmarks/verify_matmul.py` prints
the kernels on any CPU). A pass over a few tokens that costs about one step is what speculative decoding needs;
oneDNN's still costs 1.5-2.4x a one-row product at 2 to 8 rows, ours 1.07-1.7x (a whole pass over 2 to 8 tokens:
1.02-1.52 steps). A converted layer reads its own weight in place (no copy, the
same parameters, so weight digests, tied embeddings and a drafter's use of the target's head are unchanged).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from llm_modules.errors import LLMModulesError
from llm_modules.models import small_m

CPU_LINEAR_CHOICES = ("auto", "torch", "onednn", "avx2")
# CPU vendors on which MKL (torch's BLAS in its x86 wheels) was measured to take its slow path
SLOW_MKL_VENDORS = frozenset({"AuthenticAMD", "HygonGenuine"})


class OneDnnLinear(nn.Module):
    """nn.Linear's forward through oneDNN (`torch._C._nn.mkldnn_linear`), reading the same weight and bias
    parameters in place (no copy: names, state dict and weight digests are the layer's); with `small_m`, over 2 to
    16 rows through our AVX2 kernel instead (`models.small_m`). Any leading dimensions; the output is a dense tensor
    like nn.Linear's. Where autograd must reach the layer it computes as nn.Linear does."""

    def __init__(self, linear: nn.Linear, small_m: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.small_m = small_m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return nn.functional.linear(x, self.weight, self.bias)
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise LLMModulesError(f"a oneDNN linear layer takes float32 CPU inputs, got {x.dtype} on {x.device}")
        lead = x.shape[:-1]
        if x.numel() == 0:
            return x.new_zeros(*lead, self.out_features)
        flat = x.reshape(-1, self.in_features).contiguous()
        if self.small_m and small_m.MIN_ROWS <= flat.shape[0] <= small_m.MAX_ROWS:
            out = small_m.small_m_linear(flat, self.weight.contiguous(), self.bias)
        else:
            out = torch._C._nn.mkldnn_linear(flat.to_mkldnn(), self.weight.contiguous(), self.bias).to_dense()
        return out.reshape(*lead, -1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, oneDNN"
                + (", small_m" if self.small_m else ""))


def cpu_vendor() -> str | None:
    """The CPU's vendor string (x86's vendor_id: GenuineIntel, AuthenticAMD, ...), None where unknown."""
    from llm_modules.devices import cpuinfo_value

    return cpuinfo_value(("vendor_id",))


def onednn_pays(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether `--cpu-linear auto` converts: a float32 model on the CPU of a vendor on which torch's BLAS is MKL on its
    slow path (`SLOW_MKL_VENDORS`), where oneDNN was measured faster. (Where it converts, our kernel takes 2 to 16
    rows if it builds: `_converted`.)"""
    return (torch.device(device).type == "cpu" and dtype == torch.float32 and onednn_available()
            and torch.backends.mkl.is_available() and cpu_vendor() in SLOW_MKL_VENDORS)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available()


def use_cpu_linear(model: nn.Module, choice: str = "auto") -> int:
    """Run `model`'s linear layers as `choice` says (CPU_LINEAR_CHOICES); -> how many it converted. onednn on a
    model not in float32 on the CPU is an error; auto converts only where `onednn_pays`."""
    return len(_converted(model, choice))


@contextmanager
def decoding_linears(model: nn.Module, choice: str = "auto") -> Iterator[int]:
    """`use_cpu_linear` for the duration of a block that only decodes (a trainer's generation stage: the drafter
    recipe's self-prompts and answers), then the very same nn.Linear modules back for training; -> how many it
    converted."""
    swapped = _converted(model, choice)
    try:
        yield len(swapped)
    finally:
        for parent, name, original in swapped:
            setattr(parent, name, original)


def _converted(model: nn.Module, choice: str) -> list[tuple[nn.Module, str, nn.Module]]:
    if choice not in CPU_LINEAR_CHOICES:
        raise LLMModulesError(f"--cpu-linear must be one of {', '.join(CPU_LINEAR_CHOICES)}, got {choice!r}")
    first = next(model.parameters(), None)
    if choice == "torch" or first is None or (choice == "auto" and not onednn_pays(first.device, first.dtype)):
        return []
    if first.device.type != "cpu" or first.dtype != torch.float32 or not onednn_available():
        raise LLMModulesError(f"--cpu-linear {choice} runs float32 models on a CPU with torch's oneDNN; this model is "
                              f"{first.dtype} on {first.device}"
                              + ("" if onednn_available() else " and this torch has no oneDNN"))
    if choice == "avx2" and small_m.kernel() is None:
        raise LLMModulesError("--cpu-linear avx2: our kernel needs an x86-64 CPU with AVX2 and FMA and a C compiler "
                              "(cc, gcc or $CC) to build it; --cpu-linear onednn runs without it")
    return _convert(model, choice == "avx2" or (choice == "auto" and small_m.kernel() is not None))


def _convert(module: nn.Module, with_small_m: bool) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace every float32 CPU nn.Linear under `module` -> (parent, name, the replaced layer) of each."""
    swapped = []
    for name, child in module.named_children():
        if type(child) is nn.Linear and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu":
            setattr(module, name, OneDnnLinear(child, small_m=with_small_m))
            swapped.append((module, name, child))
        else:
            swapped += _convert(child, with_small_m)
    return swapped


def linear_kernel(model: Any) -> str:
    """What a report says the model's linear layers run on: "oneDNN" when any was converted ("oneDNN and ours for 2-16
    rows" with our kernel), else "torch"."""
    converted = [m for m in model.modules() if isinstance(m, OneDnnLinear)]
    if not converted:
        return "torch"
    return "oneDNN and ours for 2-16 rows" if any(m.small_m for m in converted) else "oneDNN"
