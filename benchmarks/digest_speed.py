"""What the large model's weights digest costs (format 2: every value hashed, `models/large_identity.py`).

    python benchmarks/digest_speed.py                       # the demo's large model
    python benchmarks/digest_speed.py --large SPEC

Loads the model in float32 and times, in this order: the first pass over its weights (format 1's
strided samples: what reading the memory-mapped file from disk costs), format 1 again (warm), format
2 in float32, format 2 in float32, bfloat16 and float16 in one pass (what `record` computes when a
model is composed), `record` on a file whose digests are not kept yet, and `record` after a fresh
load of the same file (kept under <LLM_MODULES_CACHE>/digests). Prints one line per timing.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from llm_modules.models import large_identity
from llm_modules.models.specs import resolve_model
from llm_modules.training.config import DEMO


def timed(label: str, fn):
    started = time.perf_counter()
    out = fn()
    print(f"{label}: {time.perf_counter() - started:.2f} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", default=DEMO["large"])
    args = parser.parse_args()

    def load():
        return resolve_model(args.large, with_tokenizer=False).model

    model = timed("load (memory-mapped)", load)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"{args.large}: {size / 1e9:.2f} GB of float32; {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f}")
    key = large_identity._file_key(model)
    if key is not None:  # time a first record: forget what is kept for this file
        large_identity._digest_file(key).unlink(missing_ok=True)
    timed("format 1 (strided samples), first pass over the weights", lambda: large_identity.sampled_digest(model))
    timed("format 1 again (warm)", lambda: large_identity.sampled_digest(model))
    timed("format 2, float32", lambda: large_identity.weights_digest(model))
    timed("format 2, float32 + bfloat16 + float16 in one pass",
          lambda: large_identity.weights_digests(model, [large_identity.NATIVE, "bfloat16", "float16"]))
    timed("record, first time for this file", lambda: large_identity.record(model))
    again = load()
    timed("record after a fresh load of the same file (kept digests)", lambda: large_identity.record(again))


if __name__ == "__main__":
    main()
