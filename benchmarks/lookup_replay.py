"""Prompt lookup's match rule, replayed on the target's own greedy answers: which occurrence of the context's
tail to copy from (the first or the most recent) and which n-gram lengths, measured as tokens per verify pass.

    python benchmarks/lookup_replay.py [--reports reports/spec_bench] [--k 10] [--output reports/spec_bench/lookup_match]

Greedy speculative decoding yields exactly the target's own tokens, so the tokens each verify pass keeps follow
from the target's answer alone: per pass, the proposer copies up to K tokens from the context (prompt + answer
so far), the pass keeps the copied tokens that equal the answer's next ones plus the target's own token. The
answers are every `target alone (our engine)` output in REPORTS/*/questions.jsonl (benchmarks/speculative.py
--spec-bench), each question once; prompts are rebuilt in the target's chat template. No model runs and no
time is measured: a pass's cost is the same for every rule here but the nodes it verifies (given).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import spec_bench  # noqa: E402

RULES = {  # name: (longest n, shortest n, copy from the first occurrence, continue a copy that reaches the end)
    "most recent, n 3..1 (ours before)": (3, 1, False, True),
    "most recent, n 2..1": (2, 1, False, True),
    "most recent, n 4..1": (4, 1, False, True),
    "most recent, n 3..2": (3, 2, False, True),
    "first, n 2..1, no continuation (transformers)": (2, 1, True, False),
    "first, n 3..1 (ours now)": (3, 1, True, True),
    "first, n 4..1": (4, 1, True, True),
    "first, n 5..1": (5, 1, True, True),
}


def match(context: list[int], k: int, longest: int, shortest: int, first: bool) -> list[int]:
    end = len(context)
    for n in range(min(longest, end - 1), shortest - 1, -1):
        tail = context[end - n:]
        starts = range(0, end - n) if first else range(end - n - 1, -1, -1)
        for s in starts:
            if context[s: s + n] == tail:
                return context[s + n: s + n + k]
    return []


def propose(context: list[int], k: int, longest: int, shortest: int, first: bool, extend: bool) -> list[int]:
    found = match(context, k, longest, shortest, first)
    while extend and found and len(found) < k:
        more = match(context + found, k - len(found), longest, shortest, first)
        if not more:
            break
        found += more
    return found


def replay(prompt: list[int], answer: list[int], k: int, rule: tuple) -> tuple[int, int]:
    """(verify passes, nodes verified) to give `answer` (its first token comes from the prefill)."""
    context, done, passes, nodes = list(prompt) + answer[:1], 1, 0, 0
    while done < len(answer):
        drafts = propose(context, k, *rule)
        kept = 0
        while kept < len(drafts) and done + kept < len(answer) and drafts[kept] == answer[done + kept]:
            kept += 1
        take = min(kept + 1, len(answer) - done)
        context += answer[done: done + take]
        done += take
        passes += 1
        nodes += 1 + len(drafts)
    return passes, nodes


def main() -> None:
    from llm_modules.data.prompting import prompt_ids
    from llm_modules.models.specs import resolve_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reports", default="reports/spec_bench")
    parser.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--output", default="reports/spec_bench/lookup_match")
    args = parser.parse_args()
    tokenizer = resolve_tokenizer(args.target)
    questions = {q["id"]: q for q in spec_bench.load_questions() + spec_bench.load_humaneval(164)}
    answers = {}
    for log in sorted(Path(args.reports).glob("*/questions.jsonl")):
        for line in log.read_text().splitlines():
            r = json.loads(line)
            if r["method"] == "target alone (our engine)":
                answers.setdefault(r["id"], r["output"])
    per = defaultdict(lambda: defaultdict(list))
    for qid, answer in answers.items():
        q = questions[qid]
        prompt = prompt_ids([{"role": "user", "content": q["prompt"]}], tokenizer, "chat")
        for name, rule in RULES.items():
            passes, nodes = replay(prompt, answer, args.k, rule)
            per[name][q["category"]].append((len(answer) / passes, nodes / passes))
    categories = [c for c in (*spec_bench.CATEGORIES, *spec_bench.EXTRA) if c in per[next(iter(RULES))]]
    counts = {c: len(per[next(iter(RULES))][c]) for c in categories}
    lines = ["# Prompt lookup's match rule, replayed on the target's own answers", "",
             f"Command: `python benchmarks/lookup_replay.py {' '.join(sys.argv[1:])}`  ",
             f"Target {args.target}, K={args.k}; {len(answers)} questions (per category: "
             + ", ".join(f"{c} {n}" for c, n in counts.items()) + f") from {args.reports}/*/questions.jsonl. "
             "Cells: mean tokens per verify pass (the target's own token included) / mean nodes verified per pass.",
             "", "| rule | " + " | ".join(categories) + " |", "|---|" + "---|" * len(categories)]
    for name in RULES:
        cells = [per[name][c] for c in categories]
        lines.append(f"| {name} | " + " | ".join(f"{sum(a for a, _ in v) / len(v):.2f} / {sum(b for _, b in v) / len(v):.1f}"
                                                 for v in cells) + " |")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
