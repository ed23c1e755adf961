"""Spec-Bench (Xia et al. 2024), the field's benchmark of speculative decoding, as our benchmarks read it.

`benchmarks/data/spec_bench/question.jsonl` (see SOURCE.md there) holds 480 questions; Spec-Bench reports
six categories: `mt_bench` (MT-Bench's eight categories, 80 questions) and 80 each of translation,
summarization, qa, math_reasoning and rag, plus `overall`. As in its `evaluation/speed.py`:
- a method's speed-up in a category is the mean of its per-question tokens/s over the mean of the target
  alone's per-question tokens/s (not a ratio of sums);
- "mean accepted tokens" is the mean over verify passes of the tokens a pass yields (the drafts the target
  kept plus its own token), so 1.0 means no draft was ever kept.
Questions are read at their first turn (Spec-Bench's MT-Bench questions have two; the second needs the
first answer, which differs per method only by rounding, so we leave it out as many CPU studies do).

On a 2-core CPU the 480 questions take hours per method: `select` takes N per category, spread over the
category (MT-Bench's round-robin over its eight), the same N questions for every method and every run.

Beside the six, `humaneval` (code completion: complete a Python function from its signature and docstring,
HumanEval's 164 problems, `data/humaneval/`, MIT licence) is reported as its own column and left out of
`overall`, which stays Spec-Bench's.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable

QUESTIONS = Path(__file__).parent / "data" / "spec_bench" / "question.jsonl"
MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
CATEGORIES = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
HUMANEVAL = Path(__file__).parent / "data" / "humaneval" / "HumanEval.jsonl.gz"
EXTRA = ("humaneval",)  # reported beside Spec-Bench's categories, not in its overall
CODE_INSTRUCTION = "Complete the following Python function.\n\n```python\n{}```"


def load_humaneval(n: int, path: str | Path = HUMANEVAL) -> list[dict]:
    """`n` HumanEval problems spread evenly over the 164, as questions ({"id": "HumanEval/i", "category":
    "humaneval", "prompt": the instruction around the function's signature and docstring})."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    n = min(n, len(problems))
    return [{"id": problems[i * len(problems) // n]["task_id"], "category": "humaneval", "subcategory": "humaneval",
             "prompt": CODE_INSTRUCTION.format(problems[i * len(problems) // n]["prompt"])} for i in range(n)]


def category_of(raw: str) -> str:
    """A question's Spec-Bench category (MT-Bench's eight fold into `mt_bench`)."""
    if raw in MT_BENCH:
        return "mt_bench"
    if raw not in CATEGORIES:
        raise ValueError(f"unknown Spec-Bench category {raw!r}")
    return raw


def load_questions(path: str | Path = QUESTIONS) -> list[dict]:
    """[{"id", "category" (one of CATEGORIES), "subcategory", "prompt" (the first turn)}] in file order."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            out.append({"id": record["question_id"], "category": category_of(record["category"]),
                        "subcategory": record["category"], "prompt": record["turns"][0]})
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise ValueError(f"{path}:{n}: not a Spec-Bench question ({err})") from None
    return out


def select(questions: list[dict], per_category: int, categories: Iterable[str] = CATEGORIES) -> list[dict]:
    """`per_category` questions of each category, spread evenly over it (MT-Bench: round-robin over its eight
    subcategories, so 8 per category takes one of each), in CATEGORIES order. Deterministic."""
    if per_category < 1:
        raise ValueError(f"per_category must be >= 1, got {per_category}")
    chosen = []
    for category in categories:
        pool = [q for q in questions if q["category"] == category]
        if category == "mt_bench":
            by_sub = defaultdict(list)
            for q in pool:
                by_sub[q["subcategory"]].append(q)
            pool = [q for group in zip(*(by_sub[s] for s in MT_BENCH)) for q in group]  # w1 r1 ... h1 w2 ...
            chosen += pool[:per_category]
        else:
            n = min(per_category, len(pool))
            chosen += [pool[i * len(pool) // n] for i in range(n)]
    return chosen


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def leaked(training_prompts: Iterable[str], questions: list[dict]) -> list[int]:
    """Ids of the questions that appear (whitespace and case aside) inside any training prompt: Spec-Bench is
    evaluation data, and a drafter trained on its questions would be measured on what it saw."""
    texts = [normalise(t) for t in training_prompts]
    return [q["id"] for q in questions if any(normalise(q["prompt"]) in t for t in texts)]


def summarize(per_question: list[dict], baseline: str) -> dict[str, dict[str, dict]]:
    """per_question: {"method", "category", "tokens", "seconds", "passes", "accepted" (drafts kept; both None
    for a method whose passes we do not see, e.g. transformers')}. -> {method: {category or "overall": {"speedup", "tokens_per_s", "mean_accepted", "n"}}},
    speed-ups against `baseline` (a method name in per_question) in the same category, as Spec-Bench computes."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in per_question:
        groups[(r["method"], r["category"])].append(r)
        if r["category"] not in EXTRA:
            groups[(r["method"], "overall")].append(r)

    def mean_speed(rows: list[dict]) -> float:
        return sum(r["tokens"] / r["seconds"] for r in rows) / len(rows)

    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for (method, category), rows in groups.items():
        base = groups.get((baseline, category))
        passes = [r.get("passes") for r in rows]
        out[method][category] = {
            "n": len(rows),
            "tokens_per_s": round(mean_speed(rows), 3),
            "speedup": round(mean_speed(rows) / mean_speed(base), 3) if base else None,
            # each verify pass yields the drafts it kept plus the target's own token
            "mean_accepted": (round(1 + sum(r["accepted"] for r in rows) / sum(passes), 3)
                              if all(p for p in passes) else None),
        }
    return dict(out)


def table(summary: dict[str, dict[str, dict]]) -> list[str]:
    """A markdown table: one row per method, per category "speed-up (mean accepted)"."""
    columns = [c for c in (*CATEGORIES, "overall", *EXTRA) if any(c in s for s in summary.values())]
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for method, cats in summary.items():
        cells = []
        for c in columns:
            s = cats.get(c)
            if s is None:
                cells.append("")
                continue
            speed = f"{s['speedup']:.2f}x" if s["speedup"] is not None else f"{s['tokens_per_s']:.2f} tok/s"
            cells.append(speed + (f" ({s['mean_accepted']:.2f})" if s["mean_accepted"] is not None else ""))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines
