"""Epoch time of a composed model with cached large-model states, without them, and of fine-tuning
the small model alone, on the same data, measured in one run; plus the state cache's size on disk.

    python benchmarks/train_speed.py                     # packaged Qwen2.5-Coder-0.5B -> SmolLM2-135M
    python benchmarks/train_speed.py --data reasoning-gym:gsm_symbolic?size=96&seed=3 --batch-size 4

The cached run's epoch time excludes building the cache (reported separately: it is paid once and
reused by every later epoch and run).
"""

from __future__ import annotations

import argparse
import atexit
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from llm_modules.training.config import TrainConfig
from llm_modules.training.loop import train


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--small", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="reasoning-gym:gsm_symbolic?size=48&seed=3")
    parser.add_argument("--template", default="chat")
    parser.add_argument("--head", default="residual")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=320)
    parser.add_argument("--state-cache-dtype", default="float32")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="llm-modules-bench-"))
    atexit.register(shutil.rmtree, work, True)  # the runs hold GBs of checkpoints
    common = dict(large=args.large, small=args.small, data=args.data, template=args.template, head=args.head,
                  batch_size=args.batch_size, max_length=args.max_length, epochs=1, num_samples=0,
                  progress=False, state_cache_dir=str(work / "states"), state_cache_dtype=args.state_cache_dtype)
    results = {}

    start = time.perf_counter()
    cached = train(TrainConfig.from_flags(output=str(work / "cached"), **common))
    results["cached_epoch_s"] = cached["train_seconds"]
    results["cached_total_s_incl_cache_build"] = round(time.perf_counter() - start, 1)
    results["state_cache_mib"] = round(folder_bytes(work / "states") / 2**20, 1)

    uncached = train(TrainConfig.from_flags(output=str(work / "uncached"), state_cache=False,
                                            **{k: v for k, v in common.items() if k != "state_cache_dir"}))
    results["uncached_epoch_s"] = uncached["train_seconds"]

    plain = {k: v for k, v in common.items() if k not in ("state_cache_dir", "head")}
    small_only = train(TrainConfig.from_flags(output=str(work / "small_only"), method="finetune", **plain))
    results["small_only_epoch_s"] = small_only["train_seconds"]
    results["steps"] = {"cached": cached["steps"], "uncached": uncached["steps"], "small_only": small_only["steps"]}
    results["uncached_over_cached"] = round(results["uncached_epoch_s"] / results["cached_epoch_s"], 2)
    results["cached_over_small_only"] = round(results["cached_epoch_s"] / results["small_only_epoch_s"], 2)
    results["machine"] = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    results["config"] = {k: v for k, v in vars(args).items()}
    print(f"epoch: cached {results['cached_epoch_s']} s, uncached {results['uncached_epoch_s']} s "
          f"({results['uncached_over_cached']}x), small model alone {results['small_only_epoch_s']} s; "
          f"state cache {results['state_cache_mib']} MiB")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
