"""Where `train --method distill`'s student starts: held-out bits per byte before any training step, for each way
its new embeddings over the large vocabulary can start, beside the small model alone (its own tokenizer).

    python benchmarks/distill_init.py [--large qwen2.5-coder-1.5b-instruct] [--small smollm2-135m-instruct] \
        [--task gsm_symbolic:32 --task family_relationships:48] [--output reports/distill_init]

The held-out sets are transfer_report's (`--task TASK:N`: `reasoning-gym:TASK?size=N&seed=10000`, chat template, max length 512),
scored by the evaluation harness in bits per byte of the answer text (comparable across tokenizers). Not timed:
the numbers do not depend on what else runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import transfer_report  # noqa: E402  (its held-out sets and scoring, so these numbers are its zero-shot rows')


def bits_per_byte(scorer, task: str, size: int) -> float:
    unit = {"test_data": f"reasoning-gym:{task}?size={size}&seed={transfer_report.TEST_SEED}", "template": "chat",
            "max_length": 512, "max_new_tokens": 1, "eval_batch_size": 8}
    return round(transfer_report.score_test(unit, scorer, keep_samples=False, generate=False)["bits_per_byte"], 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--small", default="smollm2-135m-instruct")
    parser.add_argument("--task", action="append", default=None, metavar="TASK:N", help="a task and its held-out size")
    parser.add_argument("--output", default="reports/distill_init")
    args = parser.parse_args()
    import torch

    from llm_modules.evaluation.harness import PlainScorer
    from llm_modules.models.plain import PlainSpec, build_plain, special_ids
    from llm_modules.models.specs import resolve_model

    torch.manual_seed(0)  # the random init's draw
    sizes = dict((t.split(":")[0], int(t.split(":")[1])) for t in args.task or
                 ["gsm_symbolic:32", "family_relationships:48"])  # the equal-time reports' held-out sizes
    tasks = list(sizes)
    large = resolve_model(args.large)
    vocab = large.model.get_output_embeddings().weight.shape[0]
    ids = special_ids(large.model, large.tokenizer)
    del large
    small = resolve_model(args.small)
    rows = {"small model alone": PlainScorer(small.model.eval(), small.tokenizer)}
    for init in ("mapped", "random"):
        spec = PlainSpec("distill", args.small, teacher=args.large, vocab_size=vocab, special_ids=ids, student_init=init)
        student, tokenizer = build_plain(spec)
        rows[f"distill student, {init}"] = PlainScorer(student.eval(), tokenizer)
    results = {row: {task: bits_per_byte(scorer, task, sizes[task]) for task in tasks} for row, scorer in rows.items()}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"large": args.large, "small": args.small, "test_sizes": sizes,
                                                  "bits_per_byte": results}, indent=1))
    lines = ["| row | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join(f"{v:.3f}" for v in by_task.values()) + " |" for row, by_task in results.items()]
    (out / "results.md").write_text(
        f"# Where the distilled student starts (held-out bits per byte, before training)\n\n"
        f"Command: `python benchmarks/distill_init.py --large {args.large} --small {args.small} "
        + " ".join(f"--task {t}:{n}" for t, n in sizes.items()) + "`\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
