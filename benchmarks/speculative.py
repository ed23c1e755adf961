"""Speculative decoding of a target model: our composed drafters against the drafters users already have, all
rows in one run, on the same prompts, greedy.

    python benchmarks/speculative.py --drafter runs/drafter-eca --drafter runs/drafter-xattn \
        [--target qwen2.5-coder-1.5b-instruct] [--assistant qwen2.5-coder-0.5b-instruct] \
        [--data reasoning-gym:gsm_symbolic?size=8&seed=999] [--data reasoning-gym:family_relationships?size=8&seed=999] \
        [--batch 1 --batch 8] [--max-new-tokens 128] [--draft-tokens 3 --draft-tokens 5] [--output reports/speculative]

Rows, per task and batch size:
  target alone (our engine)                 the reference: its greedy tokens are what every row must give
  target alone (transformers generate)      the same model through transformers' own loop
  assisted: ASSISTANT as draft model         transformers' assisted generation (batch 1 only, as transformers allows)
  prompt lookup                              transformers' prompt lookup decoding (batch 1 only)
  ours: DRAFTER, K                           each --drafter folder at each --draft-tokens K (our engine)
  ours: DRAFTER tree w=W[+lookup], K         (--tree-width W) a draft tree: the drafter's chain and its W - 1
                                             runners-up per depth, with lookup's copy in the same verify pass
  ours: DRAFTER tree w=W+lookup adaptive, K  (--adaptive) that tree with the drafting policy, as `--draft DIR`
                                             decodes by default (`DraftPolicy`)
Per row: generated tokens/s (all rows' new tokens over the wall time of the whole batch loop), speed-up over the
target alone in the same engine, mean draft tokens accepted per verify pass (ours), the drafter's training
seconds (its run's summary: training, target generation and the state cache's build, also when it reused a cache
that another drafter of the run built), and how many outputs equal the target's own. The +lookup rows also count
the rows each source drafted (summed over verify passes) and the passes where every row copied, so the drafter
drafted one token only.
Prompts are the tasks' questions in the target's chat template. Nothing else should run: a timed benchmark.

Spec-Bench mode (`--spec-bench N`: N questions of each of its six categories, batch 1, first turns, see
benchmarks/spec_bench.py): the same rows plus prompt lookup in our engine (`ours: prompt lookup, K`; with
--adaptive or --only-default also with the drafting policy, as `--draft prompt-lookup` decodes), timed
per question, reported per category and overall as Spec-Bench reports them (speed-up = mean tokens/s over the
target alone's; mean accepted tokens per verify pass, counting the target's own token). Each question's result
is appended to OUTPUT/questions.jsonl as it finishes; a rerun with the same options skips what is there. A
drafter whose training prompts contain a Spec-Bench question is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from llm_modules.data.prompting import prompt_ids
from llm_modules.data.sources import load_records
from llm_modules.decoding.engine import DecodeBatch, Sequence
from llm_modules.decoding.generation import generate
from llm_modules.decoding.sampling import SamplingOptions
from llm_modules.decoding.speculative.batch import SpeculativeBatch
from llm_modules.decoding.speculative.composed_proposer import ComposedProposer
from llm_modules.decoding.speculative.eagle3_proposer import Eagle3Proposer
from llm_modules.decoding.speculative.policy import DraftPolicy
from llm_modules.decoding.speculative.prompt_lookup import PromptLookup
from llm_modules.decoding.speculative.tree_proposer import TreeProposer
from llm_modules.devices import machine_description
from llm_modules.models.cpu_linear import CPU_LINEAR_CHOICES, linear_kernel, use_cpu_linear
from llm_modules.models.composed import LLMModulesModel
from llm_modules.models.drafter import DrafterRecord, load_draft_vocab
from llm_modules.models.eagle3_folder import eagle3_folder, load_eagle3
from llm_modules.models.specs import resolve_model
from llm_modules.tensors import DTYPES, left_pad

WARMUP_TOKENS = 8  # an untimed short run of every row first
PARTS = ("prefill_seconds", "draft_seconds", "verify_seconds", "rollback_seconds")  # where a speculative batch's time went
SOURCES = ("lookup_rows",)  # a tree proposer's count: rows whose tree held prompt lookup's copy, summed over passes


def prompts_of(spec: str, tokenizer, n: int) -> list[list[int]]:
    records = load_records(spec)[:n]
    return [prompt_ids([m for m in r.messages if m["role"] == "user"][:1], tokenizer, "chat", r.system)
            for r in records]


def batches(prompts: list[list[int]], size: int) -> list[list[list[int]]]:
    return [prompts[i: i + size] for i in range(0, len(prompts), size)]


@torch.no_grad()
def run_ours(target, prompts, size, max_new, pad, eos, drafter=None):
    """Our engine, greedy: (outputs, seconds, stats or None); a tree proposer's counts (SOURCES) are in stats
    too, for this call alone."""
    outputs, seconds = [], 0.0
    stats = {"passes": 0, "row_passes": 0, "accepted": 0, **{part: 0.0 for part in PARTS}}
    before = drafter.counts() if hasattr(drafter, "counts") else None
    for chunk in batches(prompts, size):
        ids, mask = left_pad(chunk, pad)
        start = time.perf_counter()
        out = generate(target, ids, mask, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=pad, drafter=drafter)
        seconds += time.perf_counter() - start
        if drafter is not None:
            for name in stats:
                stats[name] += getattr(drafter.last_batch_stats, name)
        outputs += [trim(row[ids.shape[1]:].tolist(), eos, pad) for row in out]
    if before is not None:
        stats.update({name: n - before[name] for name, n in drafter.counts().items() if name != "passes"})
    return outputs, seconds, (stats if drafter is not None else None)


@torch.no_grad()
def run_queue(target, prompts, size, max_new, pad, eos, drafter=None):
    """Our engine serving `prompts` as a queue, `size` rows at a time: a row that finishes is replaced by the next
    prompt at the next step (continuous batching, as `serve` runs it). Returns what run_ours returns."""
    batch = DecodeBatch(target, pad) if drafter is None else SpeculativeBatch(target, drafter, pad)
    before = drafter.counts() if hasattr(drafter, "counts") else None
    seqs = [Sequence(p, SamplingOptions(max_new_tokens=max_new), eos) for p in prompts]
    waiting = list(seqs)
    start = time.perf_counter()
    while batch.rows or waiting:
        room = size - len(batch.rows)
        if room > 0 and waiting:
            batch.add(waiting[:room])
            waiting = waiting[room:]
        batch.step()
    seconds = time.perf_counter() - start
    for seq in seqs:
        if seq.finish_reason == "error":
            raise RuntimeError(f"a queued row failed: {seq.error}")
    stats = None
    if drafter is not None:
        stats = {name: getattr(batch.stats, name) for name in ("passes", "row_passes", "accepted", *PARTS)}
        if before is not None:
            stats.update({name: n - before[name] for name, n in drafter.counts().items() if name != "passes"})
    return [trim(s.tokens, eos, pad) for s in seqs], seconds, stats


def our_drafter(model, k, pad, vocab, lookup: bool = False, width: int | None = None, adaptive: bool = False,
                policy: dict | None = None) -> ComposedProposer | TreeProposer:
    """The drafter `model` drafting k tokens a pass, as a chain; with a `width`, a draft tree: the drafter's chain
    with width - 1 runners-up per depth and, with lookup, prompt lookup's copy (its default K) in the same verify
    pass; `adaptive`: with the drafting policy `--draft` uses by default (`DraftPolicy`, fresh per row), its fields
    set from `policy` where given."""
    if isinstance(model, LLMModulesModel):
        drafter, vocab_size = ComposedProposer(model, draft_tokens=k, pad_id=pad, vocab=vocab), model.vocab_size
    else:  # an EAGLE-3 network (its own draft vocabulary, d2t)
        drafter, vocab_size = Eagle3Proposer(model, draft_tokens=k, pad_id=pad), model.config.vocab_size
    if width is None:
        return drafter
    tree = TreeProposer(drafter, PromptLookup(vocab_size) if lookup else None, width=width)
    tree.policy = DraftPolicy(**(policy or {})) if adaptive else None
    return tree


def policy_field(text: str) -> tuple[str, Any]:
    """FIELD=VALUE -> (field, value) for `DraftPolicy`, the value of the field's own type (a bool from 0/1)."""
    name, _, value = text.partition("=")
    default = {f.name: f.default for f in dataclasses.fields(DraftPolicy)}.get(name, dataclasses.MISSING)
    if not value or default is dataclasses.MISSING or not isinstance(default, (bool, int, float)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected FIELD=VALUE with FIELD a number or flag of DraftPolicy")
    try:
        return name, bool(int(value)) if isinstance(default, bool) else type(default)(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None


def adaptive_lookup(vocab_size: int, k: int) -> PromptLookup:
    """Prompt lookup copying up to k tokens with the drafting policy, as `--draft prompt-lookup` decodes."""
    lookup = PromptLookup(vocab_size, draft_tokens=k)
    lookup.policy = DraftPolicy()
    return lookup


def drafter_variants(args, model, k, pad, vocab) -> list[tuple[str, Any]]:
    """The ways each drafter runs, as (label suffix, a function making a fresh proposer): its chain alone (unless
    --no-chains), and per --tree-width its tree alone and with lookup's copy, and with --adaptive that tree with
    the drafting policy too."""
    out = []
    if args.chains:
        out.append(("", lambda: our_drafter(model, k, pad, vocab)))
    for lookup in (False, True):
        for width in args.tree_width:
            if args.only_default:
                out += [(f" tree w={width}+lookup adaptive",
                         lambda width=width: our_drafter(model, k, pad, vocab, True, width, adaptive=True))] * lookup
                out += [(f" tree w={width}+lookup adaptive, {name}={value}",
                         lambda width=width, name=name, value=value: our_drafter(
                             model, k, pad, vocab, True, width, adaptive=True, policy={name: value}))
                        for name, value in args.policy] * lookup
                continue
            out.append((f" tree w={width}{'+lookup' if lookup else ''}",
                        lambda lookup=lookup, width=width: our_drafter(model, k, pad, vocab, lookup, width)))
            if args.adaptive and lookup:
                out.append((f" tree w={width}+lookup adaptive",
                            lambda width=width: our_drafter(model, k, pad, vocab, True, width, adaptive=True)))
    return out


def load_network(folder: str, loaded, dtype):
    """A drafter folder's network: a composed drafter sharing the loaded target, or an EAGLE-3 layer (ours,
    `train --drafter-layout eagle3`, or another trainer's folder) sharing its input embedding."""
    if eagle3_folder(folder) is None:
        return LLMModulesModel.from_pretrained(folder, large=loaded, dtype=dtype).eval()
    config = loaded.model.config.get_text_config()
    network, _ = load_eagle3(folder, embeddings=loaded.model.get_input_embeddings().weight.detach(),
                             target_layers=config.num_hidden_layers, dtype=dtype)
    return network.eval()


def run_hf(target, prompts, size, max_new, pad, eos, **extra):
    outputs, seconds = [], 0.0
    for chunk in batches(prompts, size):
        ids, mask = left_pad(chunk, pad)
        start = time.perf_counter()
        out = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                              eos_token_id=eos, pad_token_id=pad, **extra)
        seconds += time.perf_counter() - start
        outputs += [trim(row[ids.shape[1]:].tolist(), eos, pad) for row in out]
    return outputs, seconds, None


def trim(tokens: list[int], eos: list[int], pad: int) -> list[int]:
    """New tokens up to and including the first end-of-sequence token (what a row really generated)."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def run_name(folder: Path, others: list[Path] = ()) -> str:
    """A drafter's name in the table: its run's folder, with best/last where two of a run are compared."""
    if folder.name not in ("best", "last"):
        return folder.name
    twice = sum(f.parent == folder.parent or f == folder.parent for f in others) > 1
    return f"{folder.parent.name}/{folder.name}" if twice else folder.parent.name


def training_vocabulary(folder: Path, tokenizer, n: int, eos: list[int]) -> torch.Tensor:
    """The n most frequent tokens of the drafter's training data, rendered as its run rendered them."""
    from llm_modules.data.prepare import render
    from llm_modules.decoding.speculative.composed_proposer import draft_vocabulary
    from llm_modules.models.saved import run_defaults

    run = run_defaults(folder)  # its run's data options, from the run_config.json beside it or above it
    if str(run.get("data", "")).startswith("self-prompts:"):  # its answers live in the generation cache only
        raise SystemExit(f"{folder}: trained on self-prompts, so no data file to count tokens in; measure it with "
                         "the draft vocabulary it trained with (--draft-vocab 0)")
    if "data" in run:
        records = load_records(run["data"])
        ids = [render(r, tokenizer, run.get("template", "chat"), "all")[0] for r in records]
        return draft_vocabulary(ids, n, always=eos)
    raise SystemExit(f"{folder}: no run_config.json beside it or above it, so no training data to count tokens in")


def saved_vocabulary(folder: Path) -> torch.Tensor | None:
    """The draft vocabulary the drafter trained with (train --draft-vocab), None for the whole one (or an EAGLE-3
    layer's, which maps its own: d2t)."""
    if eagle3_folder(folder) is not None:
        return None
    record = DrafterRecord.load(folder)
    return None if record is None else load_draft_vocab(folder, record)


def run_summary(folder: Path) -> dict | None:
    for candidate in (folder, folder.parent):
        if (candidate / "summary.json").is_file():
            return json.loads((candidate / "summary.json").read_text())
    return None


def training_costs(folders: list[Path]) -> dict[Path, float | None]:
    """Each drafter's training seconds, everything included: its prompts' writing (self-prompts), its training,
    its target generation, and its state cache's build. (A run resumed from its stages' caches counts only what
    it redid: its summary holds no clock of the interrupted run.) A run that reused a state cache
    (state_cache_seconds 0) is charged the build of the drafter that built the same cache (the same keys), looked
    up among these drafters and the runs beside them (their run folders' siblings): what it would have cost it
    alone."""
    summaries = {f: run_summary(f) for f in folders}
    runs = {(f.parent if f.name in ("best", "last") else f).resolve() for f in folders}
    neighbours = [json.loads(p.read_text()) for r in runs for p in sorted(r.parent.glob("*/summary.json"))]
    built = {tuple(s.get("state_cache_keys") or ()): float(s["state_cache_seconds"])
             for s in [*neighbours, *summaries.values()]
             if s and s.get("state_cache_keys") and s.get("state_cache_seconds")}
    costs: dict[Path, float | None] = {}
    for folder, summary in summaries.items():
        if summary is None or summary.get("train_seconds") is None:
            costs[folder] = None
            continue
        cache = float(summary.get("state_cache_seconds") or 0) or built.get(tuple(summary.get("state_cache_keys") or ()),
                                                                           0.0)
        written = float((summary.get("self_prompts") or {}).get("seconds") or 0)
        costs[folder] = round(float(summary["train_seconds"]) + float(summary.get("target_generation_seconds") or 0)
                              + written + cache, 1)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--assistant", default="qwen2.5-coder-0.5b-instruct", help="'' to skip the row")
    parser.add_argument("--drafter", action="append", default=[],
                        help="a drafter folder (train --method drafter, either layout, or an EAGLE-3 folder of another trainer), "
                             "optionally DIR@K1,K2: its own draft lengths "
                             "instead of --draft-tokens")
    parser.add_argument("--draft-tokens", action="append", type=int, default=[])
    parser.add_argument("--draft-vocab", action="append", type=int, default=[],
                        help="run each drafter drafting from the N most frequent target tokens of its training "
                             "data (its run's --data), as EAGLE-3 does; 0 (the default): the draft vocabulary it "
                             "trained with (train --draft-vocab), else the whole vocabulary")
    parser.add_argument("--no-transformers", action="store_true",
                        help="leave out transformers' rows (its generate, assisted generation, prompt lookup): a "
                             "check of our rows alone, e.g. their outputs in another precision")
    parser.add_argument("--data", action="append", default=[])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--queue", type=int, default=0, metavar="N",
                        help="serve N prompts of each task as a queue, --batch rows at a time, each finished row "
                             "replaced at the next step (continuous batching, as `serve` runs); our engine's rows "
                             "only (transformers has no such loop); --prompts unused")
    parser.add_argument("--batch", action="append", type=int, default=[])
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every row this many times per batch size, in turn (A B A B ...): the speed-up is "
                             "the median of each repeat's over the same repeat's target alone, every one listed")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="the target's, the assistant's and our drafters' precision (bfloat16 halves the bytes "
                             "a decode step reads, on CPUs with bfloat16 instructions too)")
    parser.add_argument("--cpu-linear", default="auto", choices=CPU_LINEAR_CHOICES,
                        help="kernel of the float32 target's and assistant's linear layers on the CPU (`--cpu-linear` "
                             "of generate: auto is oneDNN's with ours for 2-16 rows on AMD CPUs, torch's elsewhere)")
    parser.add_argument("--output", default="reports/speculative")
    parser.add_argument("--spec-bench", type=int, default=0, metavar="N",
                        help="Spec-Bench mode: N questions per category (of 80), batch 1; --data and --batch unused")
    parser.add_argument("--category", action="append", default=[], metavar="NAME",
                        help="Spec-Bench mode: only these categories (repeat it; default every one; '' none, with "
                             "--humaneval: HumanEval alone)")
    parser.add_argument("--humaneval", type=int, default=0, metavar="N",
                        help="Spec-Bench mode: also N HumanEval problems (code completion), their own column")
    parser.add_argument("--tree-width", action="append", type=int, default=[],
                        help="each drafter also as a draft tree of this width (runners-up per depth "
                             "+ 1), alone and with prompt lookup's copy (its default K) in the same verify pass")
    parser.add_argument("--no-chains", dest="chains", action="store_false",
                        help="leave out the drafters' chain rows (alone and behind lookup)")
    parser.add_argument("--adaptive", action="store_true",
                        help="each tree with lookup also with the drafting policy (`--draft`'s default: DraftPolicy)")
    parser.add_argument("--only-default", action="store_true",
                        help="each drafter as `--draft DIR` runs it: per --tree-width (default 5) its tree with "
                             "lookup's copy and the drafting policy, and its chain unless --no-chains")
    parser.add_argument("--lookup-tokens", action="append", type=int, default=[],
                        help="Spec-Bench mode: prompt lookup in our engine drafting K tokens per pass (default 4, as the rows measured before the default became 10)")
    parser.add_argument("--policy", action="append", default=[], type=policy_field, metavar="FIELD=VALUE",
                        help="with --only-default: each default tree also with the drafting policy's FIELD set to "
                             "VALUE (a `DraftPolicy` field, e.g. margin=0 or stand_aside=0), its own row")
    args = parser.parse_args()
    if args.only_default and not args.tree_width:
        args.tree_width = [TreeProposer.DEFAULT_WIDTH]
    data = args.data or ["reasoning-gym:gsm_symbolic?size=8&seed=999",
                         "reasoning-gym:family_relationships?size=8&seed=999"]
    sizes = args.batch or [1, 8]
    ks = args.draft_tokens or [None]
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = DTYPES[args.dtype]
    loaded = resolve_model(args.target, dtype=dtype)
    target, tokenizer = loaded.model.eval(), loaded.tokenizer
    eos = target.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [tokenizer.eos_token_id])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    assistant = (resolve_model(args.assistant, dtype=dtype).model.eval()
                 if args.assistant and not args.no_transformers else None)
    for model in (target, assistant):
        if model is not None:
            use_cpu_linear(model, args.cpu_linear)
    args.linear_kernel = linear_kernel(target)  # for the report's Machine line
    wanted = [(d.rsplit("@", 1)[0], [int(k) for k in d.rsplit("@", 1)[1].split(",")] if "@" in d else ks)
              for d in args.drafter]
    drafters = [(Path(d), load_network(d, loaded, dtype)) for d, _ in wanted]
    lengths = {Path(d): k for d, k in wanted}
    folders = [folder for folder, _ in drafters]
    costs = training_costs(folders)
    vocabularies = {(folder, n): (training_vocabulary(folder, tokenizer, n, eos) if n else saved_vocabulary(folder))
                    for folder, _ in drafters for n in args.draft_vocab or [0]}

    if args.spec_bench:
        run_spec_bench(args, target, tokenizer, pad, eos, assistant, drafters, lengths, vocabularies, folders)
        return
    rows = []
    for spec in data:
        prompts = prompts_of(spec, tokenizer, args.queue or args.prompts)
        ours = run_queue if args.queue else run_ours
        for size in sizes:
            # every row once per repeat, in turn (A B C A B C ...): each repeat's speed-ups are over the target
            # alone of the same repeat, so a comparison holds while the machine's speed drifts
            repeats = [measure(args, target, prompts, size, ours, pad, eos, assistant, drafters, lengths,
                               vocabularies, folders, costs) for _ in range(args.repeats)]
            reference = repeats[0][0][1][0]
            for i, (name, (outputs, seconds, stats), train_s, _) in enumerate(repeats[0]):
                tokens = sum(len(o) for o in outputs)
                same = sum(o == r for o, r in zip(outputs, reference))
                speedups = sorted(rate(rep[i][1]) / rate(rep[0][1]) for rep in repeats)
                row = {"task": spec, "batch": size, **({"queue": len(prompts)} if args.queue else {}), "row": name, "new_tokens": tokens,
                       "tokens_per_s": round(statistics.median(rate(rep[i][1]) for rep in repeats), 2),
                       "seconds": round(seconds, 1), "speedup": round(statistics.median(speedups), 2),
                       "accepted_per_pass": round(stats["accepted"] / max(stats["passes"], 1), 2) if stats else None,
                       "train_seconds": train_s, "identical": f"{same}/{len(reference)}"}
                if args.repeats > 1:  # every repeat's speed-up, lowest first
                    row["speedups"] = [round(x, 3) for x in speedups]
                if stats:  # rows a pass verified on average (fewer than the batch once rows finish), and
                    # where a verify pass's time goes, in milliseconds (the first repeat's)
                    row["rows_per_pass"] = round(stats["row_passes"] / max(stats["passes"], 1), 2)
                    row["ms_per_pass"] = {part: round(1000 * stats[f"{part}_seconds"] / max(stats["passes"], 1), 1)
                                          for part in ("draft", "verify", "rollback")}
                    row["prefill_seconds"] = round(stats["prefill_seconds"], 2)
                    if all(name in stats for name in SOURCES):
                        row["sources"] = {"lookup_rows": stats["lookup_rows"], "row_passes": stats["row_passes"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
            write_report(args, rows)  # after each task and batch size: a stopped run keeps what it measured


def spread(speedups: list[float] | None) -> str:
    """' (lowest-highest)' of a row's speed-ups over repeats; '' for one run."""
    return f" ({speedups[0]:.2f}-{speedups[-1]:.2f})" if speedups and len(speedups) > 1 else ""


def rate(result) -> float:
    """Tokens per second of one run's (outputs, seconds, stats)."""
    outputs, seconds, _ = result
    return sum(len(o) for o in outputs) / seconds


def measure(args, target, prompts, size, ours, pad, eos, assistant, drafters, lengths, vocabularies, folders, costs
            ) -> list[tuple[str, tuple, Any, Any]]:
    """Every row once at this batch size, the target alone first: (label, (outputs, seconds, stats), the
    drafter's training seconds, the proposer) per row."""
    # Every way of decoding runs once untimed on a short answer first: the first call of a model or
    # a shape pays one-off costs (allocator growth, kernel selection) that would bias whichever row
    # ran first (it was the target alone's, the speed-ups' denominator).
    def timed(run, *extra, **options):
        run(target, prompts[:size], size, WARMUP_TOKENS, pad, eos, *extra, **options)
        return run(target, prompts, size, args.max_new_tokens, pad, eos, *extra, **options)

    runs = [("target alone (our engine)", timed(ours), None, None)]
    if not args.no_transformers and not args.queue:
        runs.append(("target alone (transformers generate)", timed(run_hf), None, None))
    if size == 1 and assistant is not None and not args.queue:
        runs.append((f"assisted: {args.assistant}", timed(run_hf, assistant_model=assistant), None, None))
    if size == 1 and not args.no_transformers and not args.queue:
        runs.append(("prompt lookup (10 tokens)", timed(run_hf, prompt_lookup_num_tokens=10), None, None))
    for folder, model in drafters:
        for k in lengths[folder]:
            for n in args.draft_vocab or [0]:
                vocab = vocabularies[(folder, n)]
                size_note = f", vocab {n}" if n else (f", vocab {len(vocab)}" if vocab is not None else "")
                for suffix, make in drafter_variants(args, model, k or 4, pad, vocab):
                    drafter = make()
                    result = timed(ours, drafter)
                    label = f"ours: {run_name(folder, folders)}{suffix}, K={drafter.draft_tokens}{size_note}"
                    runs.append((label, result, costs[folder], drafter))
    return runs


def write_report(args, rows) -> None:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    lines = [f"# Speculative decoding: {args.target}", "",
             f"Command: `python benchmarks/speculative.py {shlex.join(sys.argv[1:])}`  ",
             f"Machine: {machine_description()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
             f"linear layers on {getattr(args, 'linear_kernel', 'torch')}; "
             f"{datetime.date.today()}. Greedy, {args.max_new_tokens} new tokens at most per prompt, "
             + (f"a queue of {args.queue} prompts per task served --batch rows at a time (a finished row replaced at "
              "the next step)" if args.queue else f"{args.prompts} prompts per task") + f"; {args.dtype}."
             + (f" Every row ran {args.repeats} times in turn; tokens/s and speed-up are medians, the speed-up over the "
                "same repeat's target alone, lowest and highest in brackets." if args.repeats > 1 else ""), "",
             "| task | batch | row | tokens/s | speed-up | accepted / pass | rows / pass | ms per pass: draft / verify / rollback "
             "| rows given lookup's copy / rows verified | drafter training s | identical |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task'].split(':')[1].split('?')[0]} | {r['batch']} | {r['row']} | {r['tokens_per_s']} | "
                     f"{r['speedup']}x{spread(r.get('speedups'))} | {r['accepted_per_pass'] if r['accepted_per_pass'] is not None else 'n/a'} | "
                     f"{r.get('rows_per_pass', 'n/a')} | "
                     f"{' / '.join(str(v) for v in r['ms_per_pass'].values()) if 'ms_per_pass' in r else 'n/a'} | "
                     f"{sources_cell(r.get('sources'))} | "
                     f"{r['train_seconds'] if r['train_seconds'] is not None else 'n/a'} | {r['identical']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def sources_cell(sources: dict | None) -> str:
    """A tree proposer's counts as a table cell: rows whose tree held lookup's copy / rows verified (both summed
    over verify passes)."""
    if not sources:
        return "n/a"
    return f"{sources['lookup_rows']} / {sources['row_passes']}"


def drafter_prompts(folder: Path) -> list[str]:
    """The user turns a drafter trained on (its run's --data), for the leak check."""
    from llm_modules.models.saved import run_defaults

    run = run_defaults(folder)  # its run's data options, from the run_config.json beside it or above it
    if str(run.get("data", "")).startswith("self-prompts:"):  # prompts the target wrote: the run kept them
        from llm_modules.training.objectives.drafter import SEEN_PROMPTS_FILE, read_seen_prompts

        seen = read_seen_prompts(folder)
        if seen is None:
            raise SystemExit(f"{folder}: trained on self-prompts but {SEEN_PROMPTS_FILE} is not beside it or above it")
        return seen
    if "data" in run:
        return [m["content"] for r in load_records(run["data"]) for m in r.messages if m["role"] == "user"]
    raise SystemExit(f"{folder}: no run_config.json beside it or above it: cannot check it never saw Spec-Bench")


def run_spec_bench(args, target, tokenizer, pad, eos, assistant, drafters, lengths, vocabularies, folders) -> None:
    """Every method over the same Spec-Bench questions, one question at a time, each timed alone."""
    import spec_bench

    categories = args.category or spec_bench.CATEGORIES
    unknown = [c for c in categories if c and c not in spec_bench.CATEGORIES]
    if unknown:
        raise SystemExit(f"--category {unknown[0]!r}: Spec-Bench's categories are {', '.join(spec_bench.CATEGORIES)}")
    questions = spec_bench.select(spec_bench.load_questions(), args.spec_bench, categories) if categories[0] else []
    questions += spec_bench.load_humaneval(args.humaneval) if args.humaneval else []
    for folder, _ in drafters:
        seen = spec_bench.leaked(drafter_prompts(folder), questions)
        if seen:
            raise SystemExit(f"{folder} was trained on Spec-Bench questions {seen[:10]}: it cannot be measured on them")
    prompts = {q["id"]: prompt_ids([{"role": "user", "content": q["prompt"]}], tokenizer, "chat") for q in questions}
    methods = [("target alone (our engine)", lambda p, n: run_ours(target, [p], 1, n, pad, eos))]
    if not args.no_transformers:
        if assistant is not None:
            methods.append((f"assisted: {args.assistant}",
                            lambda p, n: run_hf(target, [p], 1, n, pad, eos, assistant_model=assistant)))
        methods.append(("prompt lookup (transformers, 10 tokens)",
                        lambda p, n: run_hf(target, [p], 1, n, pad, eos, prompt_lookup_num_tokens=10)))
    for k in args.lookup_tokens or [4]:  # prompt lookup alone as a chain (a tree of width 1 is the same)
        methods.append((f"ours: prompt lookup, K={k}", lambda p, n, k=k: run_ours(
            target, [p], 1, n, pad, eos, drafter=PromptLookup(target.config.vocab_size, draft_tokens=k))))
        if args.adaptive or args.only_default:  # as `--draft prompt-lookup` decodes by default
            methods.append((f"ours: prompt lookup adaptive, K={k}", lambda p, n, k=k: run_ours(
                target, [p], 1, n, pad, eos, drafter=adaptive_lookup(target.config.vocab_size, k))))
    for folder, model in drafters:
        for k in lengths[folder]:
            vocab = vocabularies[(folder, (args.draft_vocab or [0])[0])]
            for suffix, make in drafter_variants(args, model, k or 4, pad, vocab):
                methods.append((f"ours: {run_name(folder, folders)}{suffix}, K={k or 4}",
                                lambda p, n, make=make: run_ours(target, [p], 1, n, pad, eos, drafter=make())))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "questions.jsonl"
    done = {(r["method"], r["id"]): r for r in map(json.loads, log.read_text().splitlines())} if log.is_file() else {}
    reference: dict[int, list[int]] = {i: done[(methods[0][0], i)]["output"] for i in prompts
                                       if (methods[0][0], i) in done}
    for name, run in methods:
        run(prompts[questions[0]["id"]], WARMUP_TOKENS)  # untimed: one-off costs of a first call
        for q in questions:
            if (name, q["id"]) in done:
                continue
            (output,), seconds, stats = run(prompts[q["id"]], args.max_new_tokens)
            if name == methods[0][0]:
                reference[q["id"]] = output
            record = {"method": name, "id": q["id"], "category": q["category"], "tokens": len(output),
                      "seconds": round(seconds, 4), "passes": stats["passes"] if stats else None,
                      "row_passes": stats["row_passes"] if stats else None,
                      "accepted": stats["accepted"] if stats else None,
                      "identical": output == reference.get(q["id"]), "output": output,
                      **{part: round(stats[part], 4) for part in PARTS if stats},
                      **{count: stats[count] for count in SOURCES if stats and count in stats}}
            done[(name, q["id"])] = record
            with log.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps({k: v for k, v in record.items() if k != "output"}), flush=True)
        write_spec_bench_report(args, list(done.values()), methods[0][0], len(questions))


def write_spec_bench_report(args, records, baseline: str, n_questions: int) -> None:
    import spec_bench

    summary = spec_bench.summarize(records, baseline)
    identical = {m: f"{sum(r['identical'] for r in records if r['method'] == m)}/"
                    f"{sum(r['method'] == m for r in records)}" for m in summary}
    lines = [f"# Spec-Bench: {args.target}", "",
             f"Command: `python benchmarks/speculative.py {shlex.join(sys.argv[1:])}`  ",
             f"Machine: {machine_description()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
             f"linear layers on {getattr(args, 'linear_kernel', 'torch')}; "
             f"{datetime.date.today()}. Greedy, batch 1, first turns, {args.max_new_tokens} new tokens at most; "
             f"{args.spec_bench} questions per category"
             f"{' of ' + ', '.join(c or 'none' for c in args.category) if args.category else ''} ({n_questions} in all; "
             f"`overall` is over these); {args.dtype}.", "",
             "Per category: speed-up over the target alone in our engine (mean tokens/s per question, as "
             "Spec-Bench computes it) and, in brackets, mean tokens per verify pass (ours only).", "",
             *spec_bench.table(summary), "",
             "| method | identical to the target alone |", "|---|---|",
             *[f"| {m} | {v} |" for m, v in identical.items()],
             *pass_cost_table(records, baseline),
             *parts_table(records),
             *sources_table(records)]
    out = Path(args.output)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text("\n".join(lines) + "\n")


def pass_cost_table(records: list[dict], baseline: str) -> list[str]:
    """Where the time goes, from the per-question records: per method of ours, milliseconds per verify pass
    (all its questions' seconds over their passes) against the target alone's milliseconds per token, tokens
    per pass, and the speed-up they imply (tokens per pass x target ms per token / ms per pass)."""
    base = [r for r in records if r["method"] == baseline]
    if not base:
        return []
    step = 1000 * sum(r["seconds"] for r in base) / max(sum(r["tokens"] for r in base), 1)
    lines = ["", f"Where the time goes: the target alone takes {step:.0f} ms per token; per method of ours, over all "
             "its questions. Both include each prompt's prefill, spread over the tokens or the passes, which makes a "
             "pass look dearer than it is (prefill left out, a pass over 1 + 4 tokens cost 0.99-1.09x a decode step "
             "in bfloat16 on a CPU with bfloat16 instructions, benchmarks/verify_pass_cost.py; on an AMD one without "
             "them, in float32, 2.9x with torch's linear kernel, 1.9x with oneDNN's, 1.2x with ours for 2-16 rows, "
             "reports/speculative/pass_cost_onednn):", "",
             "| method | ms per verify pass (drafting and prefill included) | pass / target token | "
             "tokens per pass | implied speed-up |", "|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in records):
        rows = [r for r in records if r["method"] == method]
        passes = sum(r["passes"] or 0 for r in rows)
        if not passes or not all(r["passes"] for r in rows):
            continue
        ms = 1000 * sum(r["seconds"] for r in rows) / passes
        per_pass = sum(r["tokens"] for r in rows) / passes
        lines.append(f"| {method} | {ms:.0f} | {ms / step:.2f} | {per_pass:.2f} | {per_pass * step / ms:.2f}x |")
    return lines


def parts_table(records: list[dict]) -> list[str]:
    """Per method of ours, where its time went (the speculative batch's own clocks, over all questions): prefill
    per question, then per verify pass drafting, the target's pass, choosing what to keep and rolling the caches
    back, and the rest (the decode loop around them: emitting tokens, stop checks)."""
    parts = PARTS[1:]  # per pass; prefill (PARTS[0]) is per question, absent from records older than its clock
    lines = []
    for method in dict.fromkeys(r["method"] for r in records):
        rows = [r for r in records if r["method"] == method and r.get("passes") and parts[0] in r]
        passes = sum(r["passes"] for r in rows)
        if not passes:
            continue
        ms = [1000 * sum(r[part] for r in rows) / passes for part in parts]
        timed = all(PARTS[0] in r for r in rows)
        prefill = f"{1000 * sum(r[PARTS[0]] for r in rows) / len(rows):.0f}" if timed else "n/a"
        rest = (f"{1000 * sum(r['seconds'] - sum(r[part] for part in PARTS) for r in rows) / passes:.1f}"
                if timed else "n/a")
        lines.append(f"| {method} | {prefill} | " + " | ".join(f"{x:.1f}" for x in ms) + f" | {rest} |")
    if not lines:
        return []
    return ["", "Where each method's time went (the speculative batch's own clocks, over all questions): prefill in ms "
            "per question, the rest in ms per verify pass:", "",
            "| method | prefill | drafting | target pass | acceptance and rollback | the rest |", "|---|---|---|---|---|---|",
            *lines]


def sources_table(records: list[dict]) -> list[str]:
    """Per tree method with lookup and per category: rows whose tree held lookup's copy, over rows verified."""
    totals: dict[str, dict[str, dict[str, int]]] = {}
    for r in records:
        if all(name in r for name in SOURCES) and r.get("row_passes"):
            for category in (r["category"], "overall"):
                cell = totals.setdefault(r["method"], {}).setdefault(category, {"lookup_rows": 0, "row_passes": 0})
                cell["lookup_rows"] += r["lookup_rows"]
                cell["row_passes"] += r["row_passes"]
    if not totals:
        return []
    categories = sorted({c for cats in totals.values() for c in cats} - {"overall"}) + ["overall"]
    return ["", "Rows whose draft tree held prompt lookup's copy / rows verified (summed over verify passes):", "",
            "| method | " + " | ".join(categories) + " |", "|---|" + "---|" * len(categories),
            *[f"| {m} | " + " | ".join(sources_cell(cats.get(c)) for c in categories) + " |"
              for m, cats in totals.items()]]


if __name__ == "__main__":
    main()
