"""Cached vs full-recompute decoding of a composed model, and the per-token floor, in one run.

    python benchmarks/decode_speed.py                       # packaged Qwen2.5-Coder-0.5B + SmolLM2-135M
    python benchmarks/decode_speed.py --large SPEC --small SPEC --new-tokens 256

Prints: the speed-up of the cached decoder over `use_cache=False` at N new tokens, the cached
per-token cost, and its floor: one cached decode step of the large model plus one of the small
model, each timed alone at the same context length. Both paths must produce the same tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from llm_modules import LLMModulesModel
from llm_modules.tensors import positions_from_mask


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def decoder_step_time(model: LLMModulesModel, ids: torch.Tensor, steps: int = 16) -> tuple[float, float]:
    """Mean seconds of one cached decode step of the large model alone, and of the small model alone."""
    mask = torch.ones_like(ids)
    pos = positions_from_mask(mask)
    _, large_cache = model.encode_large(ids, mask, pos, use_cache=True)
    embeds = torch.randn(1, ids.shape[1], model.small.get_input_embeddings().weight.shape[1])
    _, small_cache = model._small_decoder(use_cache=True, inputs_embeds=embeds, attention_mask=mask, position_ids=pos)
    large_total = small_total = 0.0
    for _ in range(steps):
        mask = torch.cat([mask, mask[:, :1]], 1)
        pos = positions_from_mask(mask)[:, -1:]
        start = time.perf_counter()
        _, large_cache = model.encode_large(ids[:, -1:], mask, pos, cache=large_cache, use_cache=True)
        large_total += time.perf_counter() - start
        start = time.perf_counter()
        _, small_cache = model._small_decoder(
            cache=small_cache, use_cache=True, inputs_embeds=embeds[:, -1:], attention_mask=mask, position_ids=pos
        )
        small_total += time.perf_counter() - start
    return large_total / steps, small_total / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--small", default="smollm2-135m-instruct")
    parser.add_argument("--head", default="new", help="head kind (the README's numbers use the paper's 'new' head)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = LLMModulesModel.compose(large=args.large, small=args.small, head=args.head).eval()
    ids = torch.randint(0, model.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    options = dict(max_new_tokens=args.new_tokens, eos_token_id=[])

    model.generate(ids, max_new_tokens=4, eos_token_id=[])  # warm-up
    out = {}
    cached_s = timed(lambda: out.__setitem__("cached", model.generate(ids, use_cache=True, **options)))
    prefill_s = timed(lambda: model(input_ids=ids, cache=model.new_cache(), logits_to_keep=1), repeat=3)
    full_s = timed(lambda: out.__setitem__("full", model.generate(ids, use_cache=False, **options)))
    same = torch.equal(out["cached"], out["full"])
    mid_context = out["cached"][:, : args.prompt_tokens + args.new_tokens // 2]
    large_step, small_step = decoder_step_time(model, mid_context)
    per_token = (cached_s - prefill_s) / (args.new_tokens - 1)
    result = {
        "large": args.large, "small": args.small, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
        "cached_seconds": round(cached_s, 3), "full_recompute_seconds": round(full_s, 3),
        "speedup": round(full_s / cached_s, 2), "same_tokens": same,
        "cached_ms_per_token": round(1000 * per_token, 2),
        "floor_ms_per_token": round(1000 * (large_step + small_step), 2),
        "floor_large_ms": round(1000 * large_step, 2), "floor_small_ms": round(1000 * small_step, 2),
        "overhead_over_floor": round(per_token / (large_step + small_step), 2),
        "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
    }
    print(f"cached {cached_s:.2f}s vs full recompute {full_s:.2f}s at {args.new_tokens} new tokens: "
          f"{result['speedup']}x faster, same tokens: {same}")
    print(f"cached per token {result['cached_ms_per_token']} ms; floor {result['floor_ms_per_token']} ms "
          f"(large step {result['floor_large_ms']} + small step {result['floor_small_ms']})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
