"""What a target pass over n new tokens costs against a one-token step, whole model, KV cache of a 128-token prompt,
per precision and linear-layer kernel (the question: does a verify pass cost about one step on this CPU?).

    python benchmarks/pass_cost.py [--model qwen2.5-coder-1.5b-instruct] \\
        [--rows float32:torch float32:onednn float32:avx2 bfloat16:torch] > results.md

A row is PRECISION:KERNEL, the kernel `--cpu-linear`'s (torch: torch's own linear, MKL on x86; onednn and avx2,
oneDNN's with ours for 2 to 16 rows: `llm_modules.models.cpu_linear`). Nothing else should run: a timed
measurement. Median of `--repeats` passes per width (after one warm-up pass), each followed by cropping the cache
back to the prompt."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llm_modules.devices import machine_description
from llm_modules.models.loading import load_model
from llm_modules.tensors import DTYPES

WIDTHS = (1, 2, 3, 4, 5, 8, 11, 16, 32)


def pass_seconds(model: torch.nn.Module, repeats: int) -> dict[int, float]:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 20000, (1, 128), generator=g)
    times = {}
    with torch.no_grad():
        cache = model(prompt, use_cache=True, logits_to_keep=1).past_key_values
        for n in WIDTHS:
            ids = torch.randint(100, 20000, (1, n), generator=g)
            seen = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                model(ids, past_key_values=cache, use_cache=True)
                seen.append(time.perf_counter() - start)
                cache.crop(-n)
            times[n] = statistics.median(seen[1:])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--rows", nargs="+",
                        default=["float32:torch", "float32:onednn", "float32:avx2", "bfloat16:torch"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# A target pass over n tokens against a one-token step ({args.model})\n")
    print(f"Machine: {machine_description()}, {args.threads} torch threads, torch {torch.__version__}. KV cache of a "
          f"128-token prompt; median of {args.repeats} passes per width. The first row's one-token step is the "
          f"reference of the last column.\n")
    rows = []
    for row in args.rows:
        precision, kernel = row.split(":")
        loaded = load_model(args.model, dtype=DTYPES[precision], cpu_linear=kernel)
        rows.append((row, pass_seconds(loaded.model.eval(), args.repeats)))
        del loaded
    print("| precision:kernel | " + " | ".join(f"n = {n}" for n in WIDTHS) + " | step against the first row's |")
    print("|---|" + "---|" * (len(WIDTHS) + 1))
    reference = rows[0][1][1]
    for name, times in rows:
        cells = [f"{1000 * times[n]:.0f} ms ({times[n] / times[1]:.2f}x)" for n in WIDTHS]
        print(f"| {name} | " + " | ".join(cells) + f" | {times[1] / reference:.2f}x |")


if __name__ == "__main__":
    main()
