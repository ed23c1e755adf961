"""What a verify pass costs against a one-token decode step, in our engine, with the prompt's prefill left out.

Spec-Bench's per-question times include each prompt's prefill (long for summarization and RAG), so seconds over
verify passes overstates a pass. Here, per question (one per Spec-Bench category by default), greedy, batch 1:
  - the target alone: prefill time (a 1-token generate) and decode time per token after it
    ((time of N tokens - prefill) / (N - 1));
  - prompt lookup (no network) at each K: the engine's own per-part seconds (draft, verify, rollback) per pass,
    which leave the prefill out, and the tokens per pass.

    python benchmarks/verify_pass_cost.py [--per-category 1] [--tokens 64] [--lookup-tokens 4 --lookup-tokens 8]
        [--dtype bfloat16] [--output reports/verify_pass_cost]
Nothing else should run: a timed benchmark.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

import spec_bench
from llm_modules.data.prompting import prompt_ids
from llm_modules.decoding.generation import generate
from llm_modules.decoding.speculative.prompt_lookup import PromptLookup
from llm_modules.models.specs import resolve_model
from llm_modules.tensors import DTYPES


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--per-category", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--lookup-tokens", action="append", type=int, default=[])
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--output", default="reports/verify_pass_cost")
    args = parser.parse_args()
    loaded = resolve_model(args.target, dtype=DTYPES[args.dtype])
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    options = dict(eos_token_id=eos, pad_token_id=eos[0])
    questions = spec_bench.select(spec_bench.load_questions(), args.per_category)
    generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=4, **options)  # untimed: first-call costs
    rows = []
    for q in questions:
        ids = torch.tensor([prompt_ids([{"role": "user", "content": q["prompt"]}], tokenizer, "chat")])
        _, prefill = timed(lambda: generate(model, ids, max_new_tokens=1, **options))
        out, total = timed(lambda: generate(model, ids, max_new_tokens=args.tokens, **options))
        new = out.shape[1] - ids.shape[1]
        step = (total - prefill) / max(new - 1, 1)
        row = {"id": q["id"], "category": q["category"], "prompt_tokens": ids.shape[1], "prefill_ms": round(1000 * prefill),
               "step_ms": round(1000 * step, 1), "new_tokens": new}
        for k in args.lookup_tokens or [4]:
            lookup = PromptLookup(model.config.vocab_size, draft_tokens=k)
            out, _ = timed(lambda: generate(model, ids, max_new_tokens=args.tokens, drafter=lookup, **options))
            stats = lookup.last_batch_stats
            passes = max(stats.passes, 1)
            parts = {p: round(1000 * getattr(stats, f"{p}_seconds") / passes, 1) for p in ("draft", "verify", "rollback")}
            row[f"lookup_K{k}"] = {**parts, "pass_over_step": round(sum(parts.values()) / (1000 * step), 2),
                                   "tokens_per_pass": round(1 + stats.accepted / passes, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    ks = args.lookup_tokens or [4]
    lines = ["# Verify pass against a decode step (prefill left out)", "",
             f"Command: `python benchmarks/verify_pass_cost.py {shlex.join(sys.argv[1:])}`  ",
             f"Machine: {platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
             f"{args.target}, {args.dtype}, greedy, batch 1, {args.tokens} new tokens at most.", "",
             "| question | prompt tokens | prefill ms | decode step ms | " +
             " | ".join(f"lookup K={k}: draft / verify / rollback ms per pass (pass / step; tokens per pass)" for k in ks)
             + " |", "|---|---|---|---|" + "---|" * len(ks)]
    for r in rows:
        cells = [f"{r[f'lookup_K{k}']['draft']} / {r[f'lookup_K{k}']['verify']} / {r[f'lookup_K{k}']['rollback']} "
                 f"({r[f'lookup_K{k}']['pass_over_step']}x; {r[f'lookup_K{k}']['tokens_per_pass']})" for k in ks]
        lines.append(f"| {r['category']} {r['id']} | {r['prompt_tokens']} | {r['prefill_ms']} | {r['step_ms']} | "
                     + " | ".join(cells) + " |")
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
