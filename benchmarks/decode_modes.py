"""Decode speed of every way to answer with a large and a small model, in one run, on the same prompts, greedy.

    python benchmarks/decode_modes.py [--large qwen2.5-coder-1.5b-instruct] [--small smollm2-135m-instruct] \
        [--data 'reasoning-gym:gsm_symbolic?size=8&seed=999'] [--batch 1 --batch 8] [--new-tokens 128] \
        [--small-layers 8] [--bridge eca --bridge xattn] [--compose NAME:bridge=xattn,head=projected,...] \
        [--output reports/decode_modes]

Rows (our decoding engine for all of them, the prompts in each model's own chat template):
  large alone                     the large model
  lora on large                   the large model with rank-8 LoRA adapters on every linear layer, as
                                  `train --method lora` saves and `load_model` loads it (unmerged)
  small alone                     the small model (its own tokenizer)
  distilled small                 the student `train --method distill` builds: the small model's body with tied
                                  embeddings and head over the large model's vocabulary (its tokenizer)
  composed, reads all             the large model runs on every token, the bridge and small model after it
  composed, reads prompt          the large model reads the prompt once; the bridge and the small model decode
                                  alone (`--large-reads prompt`), with all the small model's layers and with
                                  each --small-layers N
  --compose NAME:options          a composed model with exactly these compose options (a report row's; with
                                  head=own its prompts and tokens are the small model's, as small alone's)
Speed does not depend on the trained weights, so the composed rows are freshly composed (the same shapes as
a trained model's) and every row generates exactly --new-tokens tokens (no end-of-sequence stop).
Per row and batch size: generated tokens/s over the whole batch loop (prefill included), and the decode
milliseconds per token of one row: (time for N new tokens - time for 1) / (N - 1), i.e. after the prefill.
Nothing else should run: a timed benchmark.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from llm_modules.data.prompting import prompt_ids
from llm_modules.data.sources import load_records
from llm_modules.decoding.generation import generate
from llm_modules.models.composed import LLMModulesModel
from llm_modules.models.plain import add_lora, build_student, special_ids
from llm_modules.models.specs import resolve_model
from llm_modules.tensors import DTYPES, left_pad


def prompts_of(records, tokenizer) -> list[list[int]]:
    return [prompt_ids([m for m in r.messages if m["role"] == "user"][:1], tokenizer, "chat", r.system)
            for r in records]


Clock = Callable[[], float]  # seconds, as time.perf_counter (tests pass a scripted one)


@torch.no_grad()
def timed_generate(model, prompts: list[list[int]], size: int, new_tokens: int, pad: int,
                   clock: Clock = time.perf_counter) -> float:
    """Seconds `clock` counts over generating `new_tokens` for `prompts` in batches of `size` (padding excluded)."""
    seconds = 0.0
    for i in range(0, len(prompts), size):
        ids, mask = left_pad(prompts[i: i + size], pad)
        start = clock()
        generate(model, ids, mask, max_new_tokens=new_tokens, eos_token_id=[], pad_token_id=pad)
        seconds += clock() - start
    return seconds


def measure(name: str, model, all_prompts: list[list[int]], sizes: list[int], new_tokens: int, pad: int,
            at_one: int = 0, clock: Clock = time.perf_counter) -> list[dict]:
    """One report row per batch size: throughput over the whole loop, and the decode time per token of one
    row, (time for `new_tokens` - time for 1) / (new_tokens - 1) per batch."""
    timed_generate(model, all_prompts[:1], 1, 4, pad, clock)  # warm-up
    rows = []
    for size in sizes:
        prompts = all_prompts[:at_one] if size == 1 and at_one else all_prompts
        seconds = timed_generate(model, prompts, size, new_tokens, pad, clock)
        first = timed_generate(model, prompts, size, 1, pad, clock)  # the prefill and one token, the same batches
        batches = -(-len(prompts) // size)
        decode_ms = 1000 * (seconds - first) / batches / (new_tokens - 1)
        row = {"row": name, "batch": size, "tokens_per_s": round(len(prompts) * new_tokens / seconds, 2),
               "seconds": round(seconds, 1), "decode_ms_per_token": round(decode_ms, 1),
               "prefill_s_per_batch": round(first / batches, 2), "prompts": len(prompts)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--small", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="reasoning-gym:gsm_symbolic?size=8&seed=999")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompts-at-1", type=int, default=0,
                        help="time batch size 1 on the first N prompts only (0: all --prompts)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="every model's precision")
    parser.add_argument("--batch", action="append", type=int, default=[])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--bridge", action="append", default=[], help="composed rows' bridges (default: eca)")
    parser.add_argument("--head", default="new", help="the composed rows' head: new (the paper's) or projected")
    parser.add_argument("--small-layers", action="append", type=int, default=[],
                        help="also time `reads prompt` with only the small model's first N layers")
    parser.add_argument("--compose", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="also time a composed model with these compose options (e.g. the rows of "
                             "benchmarks/transfer_report.py: 'composed_xattn_prompt:bridge=xattn,head=projected,"
                             "small_inputs=mapped,large_reads=prompt'); its row is named NAME")
    parser.add_argument("--no-modes", action="store_true",
                        help="time only the large, small, LoRA and --compose rows (not the --bridge x mode grid)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--output", default="reports/decode_modes")
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (decode time per token: N tokens' time minus one token's)")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.batch or [1, 8]
    records = load_records(args.data)[: args.prompts]

    dtype = DTYPES[args.dtype]
    large = resolve_model(args.large, dtype=dtype)
    large.model.eval()
    small = resolve_model(args.small, dtype=dtype)
    large_prompts, small_prompts = prompts_of(records, large.tokenizer), prompts_of(records, small.tokenizer)

    def pad_of(tokenizer) -> int:
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    rows = measure("large alone", large.model, large_prompts, sizes, args.new_tokens, pad_of(large.tokenizer),
                   args.prompts_at_1)
    rows += measure("small alone", small.model.eval(), small_prompts, sizes, args.new_tokens,
                    pad_of(small.tokenizer), args.prompts_at_1)
    student = build_student(small.model, large.model.get_output_embeddings().weight.shape[0],
                            special_ids(large.model, large.tokenizer)).to(dtype).eval()
    rows += measure("distilled small", student, large_prompts, sizes, args.new_tokens, pad_of(large.tokenizer),
                    args.prompts_at_1)
    del small, student
    composed = [] if args.no_modes else [
        (f"composed {bridge}, reads {mode}" + (f", small layers {layers}" if layers else ""),
         {"bridge": bridge, "head": args.head, "small_inputs": "mapped", "large_reads": mode, "small_layers": layers})
        for bridge in args.bridge or ["eca"]
        for mode, layers in [("all", None), ("prompt", None)] + [("prompt", n) for n in args.small_layers]]
    composed += [compose_spec(text) for text in args.compose]
    for name, options in composed:
        torch.manual_seed(0)
        model = LLMModulesModel.compose(args.large, args.small, shared_large=large, dtype=dtype, **options).eval()
        own = model.config.head == "own"  # the small model's tokens in, its own head out
        rows += measure(name, model, small_prompts if own else large_prompts, sizes, args.new_tokens,
                        pad_of(model.tokenizer), args.prompts_at_1)
        del model
    lora = add_lora(large.model, args.lora_rank, 2 * args.lora_rank).eval()  # last: it wraps the large model
    rows += measure(f"lora on large (rank {args.lora_rank}, unmerged)", lora, large_prompts, sizes, args.new_tokens,
                    pad_of(large.tokenizer), args.prompts_at_1)
    write_report(args, rows, sizes)


def compose_spec(text: str) -> tuple[str, dict]:
    """'NAME:key=value,...' -> (NAME, compose options); integers and true/false are converted."""
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--compose {text!r}: expected NAME:KEY=VALUE,...")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--compose {text!r}: {item!r} is not KEY=VALUE")
        options[key] = {"true": True, "false": False}.get(value, int(value) if value.isdigit() else value)
    return name, options


def write_report(args, rows: list[dict], sizes: list[int]) -> None:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benchmarks/decode_modes.py " + shlex.join(sys.argv[1:]),
            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
            "date": str(datetime.date.today()), "large": args.large, "small": args.small, "data": args.data,
            "prompts": args.prompts, "prompts_at_1": args.prompts_at_1 or args.prompts, "new_tokens": args.new_tokens,
            "head": args.head, "dtype": args.dtype, "compose": args.compose}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    base = {r["batch"]: r for r in rows if r["row"] == "large alone"}
    lines = [f"# Decode speed per mode: {args.large} + {args.small}", "",
             f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}; {meta['date']}. Greedy, "
             f"{args.new_tokens} new tokens per prompt, {args.prompts} prompts ({args.data}; batch 1: the first "
             f"{args.prompts_at_1 or args.prompts}); {args.dtype}; composed rows from the mode grid: head {args.head}, "
             "small inputs mapped" + "".join(f"; `{c}`" for c in args.compose) + ".", "",
             "| row | batch | tokens/s | vs large alone | decode ms / token (one row) | prefill s / batch |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["tokens_per_s"] / base[r["batch"]]["tokens_per_s"]
        lines.append(f"| {r['row']} | {r['batch']} | {r['tokens_per_s']} | {ratio:.2f}x | {r['decode_ms_per_token']} "
                     f"| {r['prefill_s_per_batch']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
