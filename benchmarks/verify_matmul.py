"""What a verify pass of M tokens costs against a one-token decode step, in one linear layer.

A speculative verify pass runs the target over 1 + K tokens per row; it pays off when that costs about
one decode step. On a CPU that holds for bfloat16 (one kernel reads the weights once for any small M) but
not necessarily for float32, where M = 1 takes a matrix-vector path and M > 1 a matrix-matrix one. This
times torch's linear layer with the target's largest shape (default Qwen2.5-1.5B's MLP: 1536 -> 8960) for
M = 1, 2, 3, 4, 5, 8 and 24 tokens, in each precision, and prints each M's time over M = 1's:

    python benchmarks/verify_matmul.py [--in-features 1536 --out-features 8960 --repeats 30]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

ROWS = (1, 2, 3, 4, 5, 8, 24)


def seconds(weight: torch.Tensor, m: int, repeats: int) -> float:
    x = torch.randn(1, m, weight.shape[1], dtype=weight.dtype)
    for _ in range(3):  # warm-up: kernel selection, allocator
        torch.nn.functional.linear(x, weight)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.nn.functional.linear(x, weight)
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
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(args.out_features, args.in_features, dtype=dtype)
        times = [seconds(weight, m, args.repeats) for m in ROWS]
        cells = [f"{1000 * t:.2f} ms ({t / times[0]:.2f}x)" for t in times]
        print(f"| {str(dtype).removeprefix('torch.')} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
