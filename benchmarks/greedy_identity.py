"""Greedy identity of speculative decoding across two versions of the code (issue 34's "the speculative
benchmark's greedy outputs are identical token for token"): no timing, outputs and acceptance only.

Decode mode: load the target and a drafter folder (train --method drafter), decode N prompts greedily with our
engine (`decoding.generation.generate`) at each batch size, the target alone and with the drafter (its
runtime built through whichever import path the code on PYTHONPATH has: today's
`decoding.speculative.composed_proposer.ComposedProposer`, or `models.drafting.ComposedDrafter` before issue
34), and write every output's new token ids and every verify pass's accepted-draft counts to --out:

    PYTHONPATH=/path/to/code python benchmarks/greedy_identity.py --drafter runs/drafter/last --out side.json \
        [--target qwen2.5-coder-0.5b-instruct] [--data 'reasoning-gym:gsm_symbolic?size=8&seed=999'] \
        [--prompts 8] [--batch 1 --batch 4] [--draft-tokens 3] [--max-new-tokens 48] [--threads 1]

Compare mode: token-for-token comparison of two such files (and of each side's speculative outputs with its
own target-alone outputs); exit status 1 when the two sides differ anywhere:

    python benchmarks/greedy_identity.py --compare before.json after.json

Prompts are built as benchmarks/speculative.py's `prompts_of` builds them (the task's first user message in
the target's chat template). Outputs are the whole new part of each row, pads included (the strictest
comparison), and its part up to the first end-of-sequence token.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch


def code_identity() -> dict:
    import llm_modules
    root = Path(llm_modules.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    import transformers
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else None
    return {"llm_modules_file": llm_modules.__file__, "commit": commit, "tracked_changes": bool(dirty),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": platform.platform(), "cpu": cpu,
            "torch_threads": torch.get_num_threads()}


def load_proposer_class():
    try:
        from llm_modules.decoding.speculative.composed_proposer import ComposedProposer
        return ComposedProposer, "llm_modules.decoding.speculative.composed_proposer.ComposedProposer"
    except ImportError:
        from llm_modules.models.drafting import ComposedDrafter
        return ComposedDrafter, "llm_modules.models.drafting.ComposedDrafter"


def prompts_of(spec: str, tokenizer, n: int) -> list[list[int]]:
    """As benchmarks/speculative.py builds them."""
    from llm_modules.data.prompting import prompt_ids
    from llm_modules.data.sources import load_records
    records = load_records(spec)[:n]
    return [prompt_ids([m for m in r.messages if m["role"] == "user"][:1], tokenizer, "chat", r.system)
            for r in records]


def trim(tokens: list[int], eos: list[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


@torch.no_grad()
def run(target, prompts, size, max_new, pad, eos, proposer=None) -> dict:
    from llm_modules.decoding.generation import generate
    from llm_modules.tensors import left_pad
    result = {"raw": [], "outputs": [], "accepted_per_pass": [], "stats": []}
    calls = []
    if proposer is not None:  # every verify pass's accepted-draft counts (one per row still decoding)
        original = proposer.commit

        def commit(accepted, tokens, states):
            calls.append([int(a) for a in accepted.tolist()])
            return original(accepted, tokens, states)
        proposer.commit = commit
    try:
        for start in range(0, len(prompts), size):
            chunk = prompts[start: start + size]
            ids, mask = left_pad(chunk, pad)
            calls.clear()
            out = generate(target, ids, mask, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=pad,
                           drafter=proposer)
            for row in out:
                new = row[ids.shape[1]:].tolist()
                result["raw"].append(new)
                result["outputs"].append(trim(new, eos))
            if proposer is not None:
                result["accepted_per_pass"].append(list(calls))
                s = proposer.last_batch_stats
                names = ("passes", "row_passes", "drafted", "accepted", "emitted")
                result["stats"].append({name: getattr(s, name) for name in names if hasattr(s, name)})
    finally:
        if proposer is not None:
            del proposer.commit
    if proposer is None:
        del result["accepted_per_pass"], result["stats"]
    else:
        passes = sum(s["passes"] for s in result["stats"])
        result["mean_accepted_per_pass"] = sum(s["accepted"] for s in result["stats"]) / max(passes, 1)
    return result


def decode(args) -> None:
    from llm_modules.models.composed import LLMModulesModel
    from llm_modules.models.specs import resolve_model
    if args.threads:
        torch.set_num_threads(args.threads)
    proposer_class, proposer_path = load_proposer_class()
    loaded = resolve_model(args.target, dtype=torch.float32)
    target, tokenizer = loaded.model.eval(), loaded.tokenizer
    eos = target.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [tokenizer.eos_token_id])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    model = LLMModulesModel.from_pretrained(args.drafter, large=loaded, dtype=torch.float32).eval()
    from llm_modules.models.drafter import DrafterRecord, load_draft_vocab
    record = DrafterRecord.load(args.drafter)  # its draft vocabulary (train --draft-vocab), as the benchmark reads it
    vocab = None if record is None else load_draft_vocab(args.drafter, record)
    proposer = proposer_class(model, draft_tokens=args.draft_tokens, pad_id=pad, vocab=vocab)
    prompts = prompts_of(args.data, tokenizer, args.prompts)
    report = {"code": code_identity(), "proposer": proposer_path, "command": sys.argv,
              "target": args.target, "drafter": str(Path(args.drafter).resolve()), "data": args.data,
              "draft_tokens": args.draft_tokens,
              "draft_vocab": None if vocab is None else len(vocab), "max_new_tokens": args.max_new_tokens, "eos": eos, "pad": pad,
              "prompts": prompts, "runs": {}}
    for size in args.batch:
        for name, p in (("target", None), ("speculative", proposer))[1 if args.no_target else 0:]:
            key = f"{name}/batch{size}"
            report["runs"][key] = run(target, prompts, size, args.max_new_tokens, pad, eos, p)
            r = report["runs"][key]
            print(key, "mean accepted per pass" if p else "",
                  round(r["mean_accepted_per_pass"], 3) if p else "", flush=True)
            Path(args.out).write_text(json.dumps(report))  # a stopped run keeps what it decoded
    Path(args.out).write_text(json.dumps(report))


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(path_a: str, path_b: str) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in (path_a, path_b))
    differs = False
    for side, name in ((a, path_a), (b, path_b)):
        code = side["code"]
        print(f"{name}: {side['proposer']} from {code['llm_modules_file']} at {code['commit']}"
              f"{' (tracked changes)' if code['tracked_changes'] else ''}; torch {code['torch']}, "
              f"transformers {code['transformers']}, threads {code['torch_threads']}")
    if a["prompts"] != b["prompts"]:
        print("the two sides decoded different prompts")
        return 1
    for key in a["runs"]:
        if key not in b["runs"]:
            print(f"{key}: only in {path_a}")
            differs = True
            continue
        ra, rb = a["runs"][key], b["runs"][key]
        same_raw = sum(x == y for x, y in zip(ra["raw"], rb["raw"]))
        same = sum(x == y for x, y in zip(ra["outputs"], rb["outputs"]))
        line = f"{key}: outputs identical {same}/{len(ra['outputs'])} (whole rows with padding {same_raw}/{len(ra['raw'])})"
        for i, (x, y) in enumerate(zip(ra["raw"], rb["raw"])):
            if x != y:
                differs = True
                line += f"\n  prompt {i}: first different new token at {first_difference(x, y)}"
        if "accepted_per_pass" in ra:
            equal = ra["accepted_per_pass"] == rb["accepted_per_pass"]
            differs |= not equal or ra["stats"] != rb["stats"]
            totals = [{n: sum(c[n] for c in r["stats"]) for n in r["stats"][0]} for r in (ra, rb)]
            line += (f"\n  mean accepted per pass {ra['mean_accepted_per_pass']:.4f} | {rb['mean_accepted_per_pass']:.4f};"
                     f" accepted counts of every pass identical: {equal}; each batch's stats identical: "
                     f"{ra['stats'] == rb['stats']}\n  totals {totals[0]} | {totals[1]}")
            seen = [dict(sorted(Counter(n for chunk in r["accepted_per_pass"] for counts in chunk for n in counts).items()))
                    for r in (ra, rb)]
            line += f"\n  row-passes accepting n drafts, n: count: {seen[0]} | {seen[1]}"
        print(line)
    for side, name in ((a, path_a), (b, path_b)):
        for key, r in side["runs"].items():
            if key.startswith("speculative/") and key.replace("speculative/", "target/") in side["runs"]:
                ref = side["runs"][key.replace("speculative/", "target/")]
                same = sum(x == y for x, y in zip(r["outputs"], ref["outputs"]))
                print(f"{name}: {key} equals the target alone's at that batch size: {same}/{len(ref['outputs'])}")
        sizes = sorted(k for k in side["runs"] if k.startswith("target/"))
        for k in sizes[1:]:  # the target alone at each batch size (padding) against batch 1
            same = sum(x == y for x, y in zip(side["runs"][k]["outputs"], side["runs"][sizes[0]]["outputs"]))
            print(f"{name}: {k} equals {sizes[0]}: {same}/{len(side['runs'][k]['outputs'])}")
    print("IDENTICAL" if not differs else "DIFFERENT")
    return int(differs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"))
    parser.add_argument("--target", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--drafter", help="a drafter folder (train --method drafter)")
    parser.add_argument("--data", default="reasoning-gym:gsm_symbolic?size=8&seed=999")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--batch", action="append", type=int, default=[])
    parser.add_argument("--draft-tokens", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the same on both sides; 0: torch's default)")
    parser.add_argument("--no-target", action="store_true",
                        help="leave out the target-alone runs (another drafter on prompts already decoded alone)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare))
    if not args.drafter or not args.out:
        parser.error("--drafter and --out are needed to decode")
    args.batch = args.batch or [1, 4]
    decode(args)


if __name__ == "__main__":
    main()
