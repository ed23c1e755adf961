"""What a target pass over n new tokens costs against a one-token step, whole model, KV cache of a 128-token prompt,
per precision (the question: does a verify pass cost about one step on this CPU?).

    python reports/speculative/pass_cost_avx2/pass_cost.py > reports/speculative/pass_cost_avx2/results.md
Nothing else should run: a timed measurement. Median of `REPEATS` passes per width, each followed by cropping the
cache back to the prompt."""

from __future__ import annotations

import platform
import statistics
import time

import torch

from llm_modules.devices import cpu_flags, native_bfloat16
from llm_modules.models.loading import load_model

WIDTHS = (1, 2, 3, 4, 5, 8, 11, 16, 32)
REPEATS = 7
torch.set_num_threads(2)
flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "bf16"})
print("# A target pass over n tokens against a one-token step (Qwen2.5-Coder-1.5B-Instruct)\n")
print(f"Machine: {platform.machine()} CPU ({', '.join(flags)}; native bfloat16: {native_bfloat16()}), 2 torch threads, "
      f"torch {torch.__version__}. KV cache of a 128-token prompt; median of {REPEATS} passes per width.\n")
rows = []
for dtype in (torch.float32, torch.bfloat16):
    loaded = load_model("qwen2.5-coder-1.5b-instruct", dtype=dtype)
    model = loaded.model.eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 20000, (1, 128), generator=g)
    with torch.no_grad():
        out = model(prompt, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        times = {}
        for n in WIDTHS:
            ids = torch.randint(100, 20000, (1, n), generator=g)
            seen = []
            for _ in range(REPEATS + 1):
                start = time.perf_counter()
                model(ids, past_key_values=cache, use_cache=True)
                seen.append(time.perf_counter() - start)
                cache.crop(-n)
            times[n] = statistics.median(seen[1:])
    rows.append((str(dtype).split(".")[-1], times))
    del model, loaded
print("| precision | " + " | ".join(f"n = {n}" for n in WIDTHS) + " |")
print("|---|" + "---|" * len(WIDTHS))
for name, times in rows:
    print(f"| {name} | " + " | ".join(f"{1000 * times[n]:.0f} ms ({times[n] / times[1]:.2f}x)" for n in WIDTHS) + " |")
