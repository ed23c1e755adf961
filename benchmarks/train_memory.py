"""Peak memory of training, measured in one run: the composed model from cached states (large
model released, the default; or kept loaded), the composed model computing states on the fly, and
LoRA (r=8) on the large model, the rival. Same data, batch and number of optimizer steps.

    python benchmarks/train_memory.py                    # packaged Qwen2.5-Coder-0.5B -> SmolLM2-135M
    python benchmarks/train_memory.py --data "reasoning-gym:gsm_symbolic?size=48&seed=3"

Each configuration runs in a process of its own, and its peak is that whole process's peak
resident memory (Linux VmHWM): loading, state caching and training, what a user's machine must
hold. On a CUDA machine the peak CUDA memory allocated is reported too. The state cache is built
once beforehand by a separate process, so no composed run pays for building it.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "composed_released": "composed, cached states, large model released (default)",
    "composed_kept": "composed, cached states, large model kept loaded (--no-release-large)",
    "composed_uncached": "composed, states computed every step (--no-state-cache)",
    "lora_large": "LoRA r=8 on the large model",
}


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (this benchmark needs Linux)")


def run_config(args: argparse.Namespace, name: str, work: Path) -> dict:
    """One configuration, in this process."""
    import torch

    from llm_modules.training.config import TrainConfig
    from llm_modules.training.loop import train

    started = time.perf_counter()
    method = "lora" if name == "lora_large" else "composed"
    summary = train(TrainConfig.from_flags(
        large=args.large, small=args.small, data=args.data, template=args.template, head=args.head, method=method,
        max_length=args.max_length, batch_size=args.batch_size, max_steps=args.steps, num_samples=0,
        lr_small=2e-4 if method == "lora" else None,
        progress=False, early_stopping_patience=0, output=str(work / f"{name}-{args.steps}"),
        state_cache_dir=str(work / "states"),
        state_cache=name != "composed_uncached", release_large=name == "composed_released",
    ))
    steps, trainable, train_s = summary["steps"], summary["parameters"]["total"]["trainable"], summary["train_seconds"]
    out = {"config": name, "steps": steps, "trainable": trainable, "train_s": round(train_s, 1),
           "process_s": round(time.perf_counter() - started, 1), "peak_rss_mib": round(peak_rss_mib())}
    if torch.cuda.is_available():
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--small", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="reasoning-gym:leg_counting?size=48&seed=3&min_animals=1&max_animals=2"
                                          "&max_instances=3")
    parser.add_argument("--template", default="chat")
    parser.add_argument("--head", default="residual")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=320)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_config(args, args.child, Path(args.work))))
        return

    with tempfile.TemporaryDirectory(prefix="llm-modules-memory-") as work:  # runs hold GBs of checkpoints
        results = measure(args, Path(work))
    report(args, results)


def measure(args: argparse.Namespace, work: Path) -> list[dict]:
    base = [sys.executable, __file__, *sys.argv[1:], "--work", str(work)]
    # Build the state cache once (a 1-step run), so no measured composed run pays for it.
    subprocess.run([*base, "--steps", "1", "--child", "composed_kept"], check=True, capture_output=True)
    results = []
    for name in args.configs:
        proc = subprocess.run([*base, "--child", name], capture_output=True, text=True)
        line = next((s for s in proc.stdout.splitlines() if s.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(f"{name} failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
        results.append(json.loads(line.removeprefix("RESULT ")))
        print(f"{name}: peak {results[-1]['peak_rss_mib']} MiB", flush=True)
    return results


def report(args: argparse.Namespace, results: list[dict]) -> None:
    lora = next((r for r in results if r["config"] == "lora_large"), None)
    print(f"\n{args.steps} steps of {args.batch_size} on {args.data}; large {args.large}, small {args.small}, "
          f"head {args.head}; {platform.machine()}, {platform.system()}\n")
    print("| configuration | trainable | peak RSS MiB | vs LoRA | train s | process s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['peak_rss_mib'] / lora['peak_rss_mib']:.2f}x" if lora else ""
        print(f"| {CONFIGS[r['config']]} | {r['trainable']:,} | {r['peak_rss_mib']:,} | {ratio} | {r['train_s']} | "
              f"{r['process_s']} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
