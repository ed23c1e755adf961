"""What a verify pass of M tokens costs against a one-token decode step, in one linear layer.

A speculative verify pass runs the target over 1 + K tokens per row; it pays off when that costs about
one decode step. On a CPU that holds for bfloat16 (one kernel reads the weights once for any small M) but
not necessarily for float32, where M = 1 takes a matrix-vector path and M > 1 a matrix-matrix one. This
times torch's linear layer with the target's largest shape (default Qwen2.5-1.5B's MLP: 1536 -> 8960) for
M = 1, 2, 3, 4, 5, 8 and 24 tokens, in each precision (float32 also through oneDNN, `--cpu-linear onednn`, and
with our kernel for 2-16 rows, `--cpu-linear avx2`), and prints each M's time over M = 1's:

    python benchmarks/verify_matmul.py [--in-features 1536 --out-features 8960 --repeats 30]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from llm_modules.models import small_m
from llm_modules.models.cpu_linear import OneDnnLinear, onednn_available

ROWS = (1, 2, 3, 4, 5, 8, 24)


def seconds(layer: torch.nn.Module, m: int, repeats: int) -> float:
    x = torch.randn(1, m, layer.in_features, dtype=layer.weight.dtype)
    with torch.no_grad():
        for _ in range(3):  # warm-up: kernel selection, allocator
            layer(x)
        start = time.perf_counter()
        for _ in range(repeats):
            layer(x)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-features", type=int, default=1536)
    parser.add_argument("--out-features", type=int, default=8960)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"linear {args.in_features} -> {args.out_features}, {args.repeats} repeats")
    print("| precision | " + " | ".join(f"M = {m}" for m in ROWS) + " |")
    print("|---|" + "---|" * len(ROWS))
    rows = [("float32", torch.float32, None), ("bfloat16", torch.bfloat16, None)]
    if onednn_available():
        rows.insert(1, ("float32, oneDNN (--cpu-linear onednn)", torch.float32, False))
        if small_m.kernel() is not None:
            rows.insert(2, ("float32, oneDNN and ours for 2-16 rows (--cpu-linear avx2)", torch.float32, True))
    for name, dtype, ours in rows:
        layer = torch.nn.Linear(args.in_features, args.out_features, bias=False, dtype=dtype)
        if ours is not None:
            layer = OneDnnLinear(layer, small_m=ours)
        times = [seconds(layer, m, args.repeats) for m in ROWS]
        cells = [f"{1000 * t:.2f} ms ({t / times[0]:.2f}x)" for t in times]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
