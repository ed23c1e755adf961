"""Knowledge-transfer report: the composed model against every baseline, same data, same budget,
same evaluation harness. Writes `reports/<task>/results.md`, `results.json` and PNG plots.

    python benchmarks/transfer_report.py --task gsm_symbolic --train-size 120 --test-size 24 --seeds 0
    python benchmarks/transfer_report.py --task leg_counting --task-args max_animals=2 --max-new-tokens 48

Each row runs in its own process (so its peak memory is its own). Every row and every seed is
evaluated on the same held-out set, generated with seed 10000 (never a training seed), so rows are
compared on identical questions; a run seed changes the training data, the initialisation and the
batch order. The zero-shot rows do not depend on a seed (greedy decoding) and run once. Rows:
  majority_answer                               no model: always the training data's most common answer
  large_zero_shot, small_zero_shot              the two models as they are
  small_finetuned                               the small model fine-tuned alone (its own tokenizer)
  composed_new / _projected / _residual         ours, causal, small model pretrained, each head kind
  composed_config_small                         ours with the paper's config-built GPT-Neo-125M, new head
  composed_leaky                                the paper's leak (causal=False), new head
  composed_leaky_residual                       the leak with the residual head (learns to exploit it sooner)
  lora_large                                    the large model fine-tuned with LoRA (r=8)
  distilled                                     a large-vocabulary student trained by KL to the large model
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TEST_SEED = 10_000  # the held-out set: one for every row and seed, disjoint from the training seeds
ROWS = ["majority_answer", "large_zero_shot", "small_zero_shot", "small_finetuned", "composed_new", "composed_projected",
        "composed_residual", "composed_config_small", "composed_leaky", "composed_leaky_residual", "lora_large", "distilled"]


def specs(args: argparse.Namespace, seed: int) -> tuple[str, str]:
    extra = "".join(f"&{kv}" for kv in args.task_args)
    train = f"reasoning-gym:{args.task}?size={args.train_size}&seed={seed}{extra}"
    test = f"reasoning-gym:{args.task}?size={args.test_size}&seed={TEST_SEED}{extra}"
    return train, test


def run_row(args: argparse.Namespace) -> dict:
    """One row, one seed, in this process: train (if the row trains), then evaluate on the test set."""
    import torch

    from llm_modules.baselines import finetune_plain
    from llm_modules.data import DataConfig
    from llm_modules.distill import distill
    from llm_modules.evaluate import ComposedScorer, EvalOptions, PlainScorer, evaluate, held_out_examples
    from llm_modules.specs import resolve_model

    torch.manual_seed(args.seed)
    train_spec, test_spec = specs(args, args.seed)
    data = DataConfig(spec=train_spec, template=args.template, max_length=args.max_length, seed=args.seed)
    row, out = args.row, {"row": args.row, "seed": args.seed, "train_data": train_spec, "test_data": test_spec}
    if row == "majority_answer":
        return out | majority_answer(train_spec, test_spec)
    curve: list[float] = []
    if row.endswith("zero_shot"):
        loaded = resolve_model(args.large if row.startswith("large") else args.small)
        scorer = PlainScorer(loaded.model, loaded.tokenizer)
        out.update(trainable=0, train_seconds=0.0, steps=0, examples_seen=0)
    elif row in ("small_finetuned", "lora_large", "distilled"):
        if row == "distilled":
            run = distill(args.large, args.small, data, epochs=args.epochs, batch_size=args.batch_size)
        else:
            spec = args.small if row == "small_finetuned" else args.large
            run = finetune_plain(spec, data, epochs=args.epochs, batch_size=args.batch_size,
                                 lr=args.lr_lora if row == "lora_large" else args.lr_small,
                                 lora_rank=8 if row == "lora_large" else 0, seed=args.seed)
        scorer, curve = PlainScorer(run.model, run.tokenizer), run.losses
        out.update(trainable=run.trainable, train_seconds=round(run.seconds, 1), steps=run.steps,
                   examples_seen=run.steps * args.batch_size)
    else:
        from llm_modules.model import LLMModulesModel
        from llm_modules.train import train
        from llm_modules.train_config import TrainConfig

        head = "residual" if row.endswith("residual") else "projected" if row.endswith("projected") else "new"
        small = "config:gpt-neo-125m" if row == "composed_config_small" else args.small
        output = Path(args.work) / f"{row}-{args.seed}"
        summary = train(TrainConfig(
            large=args.large, small=small, data=train_spec, output=str(output), head=head,
            causal="leaky" not in row, template=args.template, max_length=args.max_length, seed=args.seed,
            epochs=args.epochs, batch_size=args.batch_size, lr_bridge=args.lr_bridge, lr_small=args.lr_composed_small,
            num_samples=0, progress=False, resume=output.exists(),
            early_stopping_patience=0, state_cache_dir=str(Path(args.work) / "states"),
        ))
        model = LLMModulesModel.from_pretrained(output / "last")
        scorer = ComposedScorer(model)
        rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        val_curve = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if not args.keep_runs:  # checkpoints are about 2 GB a row; the report keeps the curves
            shutil.rmtree(output, ignore_errors=True)
        curve = [r["loss"] for r in rows if "loss" in r]
        out.update(trainable=summary["parameters"]["total"]["trainable"], train_seconds=summary["train_seconds"],
                   steps=summary["steps"], examples_seen=summary["steps"] * args.batch_size,
                   val_loss=summary["best_val_loss"], final_train_loss=curve[-1] if curve else None,
                   large_released=summary["large_released"],
                   val_curve=val_curve)
    examples = held_out_examples(DataConfig(spec=test_spec, template=args.template, max_length=args.max_length),
                                 scorer.tokenizer, scorer.max_positions, "all")
    result = evaluate(scorer, examples, EvalOptions(split="all", max_new_tokens=args.max_new_tokens,
                                                    batch_size=args.eval_batch_size, num_samples=3))
    out.update(accuracy=result.get("accuracy"), test_loss=result["loss"], test_examples=result["examples"],
               eval_seconds=result["seconds"], samples=result["samples"], loss_curve=curve,
               tokenizer="small" if row.startswith("small") else "large",
               peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    return out


def majority_answer(train_spec: str, test_spec: str) -> dict:
    """The accuracy a model reaches by always giving the most common training answer: the floor
    a trained row must clear before its accuracy says anything."""
    from collections import Counter
    from types import SimpleNamespace

    from llm_modules.data_sources import load_records
    from llm_modules.evaluate import is_correct

    counts = Counter(r.reference for r in load_records(train_spec) if r.reference is not None)
    guess = counts.most_common(1)[0][0]
    verdicts = [is_correct(SimpleNamespace(record=r), guess) for r in load_records(test_spec)]
    verdicts = [v for v in verdicts if v is not None]
    return {"trainable": 0, "train_seconds": 0.0, "steps": 0, "examples_seen": 0, "answer": guess,
            "accuracy": round(sum(verdicts) / len(verdicts), 4), "test_loss": None, "test_examples": len(verdicts),
            "eval_seconds": 0.0, "samples": [], "loss_curve": [], "tokenizer": "none", "peak_rss_mib": 0}


def fmt(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


KEPT_MARK = "†"


def kept_mark(rs: list[dict]) -> str:
    """Composed rows trained with the large model kept loaded (older runs had no release)."""
    composed = [r for r in rs if r["row"].startswith("composed")]
    return KEPT_MARK if any(not r.get("large_released", False) for r in composed) else ""


def write_report(args: argparse.Namespace, results: list[dict], wall: float) -> None:
    folder = Path(args.out)
    by_row: dict[str, list[dict]] = {}
    for r in results:
        by_row.setdefault(r["row"], []).append(r)
    command = " ".join(["python", *sys.argv])
    lines = [f"# {args.task}: knowledge transfer, composed model vs baselines", "",
             f"Command: `{command}`  ", f"Machine: {platform.machine()}, {platform.system()}, CPU only; "
             f"date {datetime.date.today()}; wall time of this invocation {wall / 60:.1f} min (finished rows are reused, not rerun); train + eval time "
             f"summed over all rows and seeds {sum(r.get('train_seconds', 0) + r.get('eval_seconds', 0) for r in results) / 60:.1f} min.  ",
             f"Training data: `{specs(args, 0)[0]}` (seed varies with the run seed); held-out test data: "
             f"`{specs(args, 0)[1]}`; template `{args.template}`, {args.epochs} epoch(s), batch {args.batch_size}, "
             f"greedy decoding, at most {args.max_new_tokens} new tokens. Seeds: {args.seeds}. Learning rates: "
             f"composed bridge {args.lr_bridge:g}, composed small model and head {args.lr_composed_small:g}, small "
             f"fine-tuned {args.lr_small:g}, LoRA {args.lr_lora:g}.", "",
             "Each cell is the mean ± sample standard deviation over the n seeds that ran.", "",
             "| row | n | accuracy | test loss / answer token | val loss | trainable params | train s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for row in ROWS:
        if row not in by_row:
            continue
        rs = by_row[row]
        failed = [r for r in rs if "error" in r]
        if failed:
            lines.append(f"| {row} | {len(rs)} | failed: {failed[0]['error'][:120]} | | | | | |")
            continue
        if row == "majority_answer":
            answers = ", ".join(sorted({repr(r["answer"]) for r in rs}))
            lines.append(f"| {row} | {len(rs)} | {fmt([r['accuracy'] for r in rs])} | no model: always {answers} "
                         "| | 0 | | |")
            continue
        loss = fmt([r["test_loss"] for r in rs]) + (" (small tokenizer)" if rs[0]["tokenizer"] == "small" else "")
        lines.append(f"| {row} | {len(rs)} | {fmt([r['accuracy'] for r in rs])} | {loss} | {fmt([r.get('val_loss') for r in rs])} "
                     f"| {rs[0]['trainable']:,} | {fmt([r['train_seconds'] for r in rs], 0)} "
                     f"| {fmt([r['peak_rss_mib'] for r in rs], 0)}{kept_mark(rs)} |")
    lines += ["", "Test loss is per answer token of each row's own tokenizer: rows marked \"small tokenizer\" are "
              "not comparable with the others. The `composed_leaky` rows' val and test losses are teacher-forced with "
              "the leak (each position reads the large model's state of the token it predicts), their accuracy comes "
              "from real generation. `majority_answer` always gives the "
              "training data's most common answer: a trained row's accuracy means little until it clears that.", ""]
    if any(kept_mark(rs) for rs in by_row.values()):
        lines += [f"{KEPT_MARK} Measured before training released the large model's weights (`release_large`, "
                  "now the default with cached states): the large model stayed loaded, so this peak is higher than "
                  "today's code needs; `benchmarks/train_memory.py` measures both.", ""]
    (folder / "results.md").write_text("\n".join(lines))
    (folder / "results.json").write_text(json.dumps(results, indent=1))
    plot(folder, by_row)


def plot(folder: Path, by_row: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row, rs in by_row.items():
        rs = [r for r in rs if "error" not in r and r.get("accuracy") is not None and r["row"] != "majority_answer"]
        if rs:
            x = max(rs[0]["trainable"], 1)
            ax.scatter([x] * len(rs), [r["accuracy"] for r in rs], label=row)
    floor = [r["accuracy"] for r in by_row.get("majority_answer", []) if "error" not in r]
    if floor:
        ax.axhline(statistics.mean(floor), color="grey", linestyle="--", label="majority answer (no model)")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (1 = none)")
    ax.set_ylabel("held-out accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "accuracy_vs_trainable.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row, rs in by_row.items():
        curve = next((r["loss_curve"] for r in rs if r.get("loss_curve")), None)
        if curve:
            ax.plot(range(1, len(curve) + 1), curve, label=row, alpha=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (KL for distilled)")
    ax.set_yscale("log")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "loss_curves.png", dpi=100)
    plt.close(fig)


def main() -> None:
    from llm_modules.train_config import TrainConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="gsm_symbolic")
    parser.add_argument("--task-args", nargs="*", default=[], help="extra reasoning-gym options, key=value")
    parser.add_argument("--large", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--small", default="smollm2-135m-instruct")
    parser.add_argument("--train-size", type=int, default=120)
    parser.add_argument("--test-size", type=int, default=24)
    parser.add_argument("--template", default="chat")
    parser.add_argument("--max-length", type=int, default=320)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--lr-small", type=float, default=5e-5)
    parser.add_argument("--lr-lora", type=float, default=2e-4)
    parser.add_argument("--lr-bridge", type=float, default=TrainConfig.lr_bridge,
                        help="composed rows: the bridge's learning rate")
    parser.add_argument("--lr-composed-small", type=float, default=TrainConfig.lr_small,
                        help="composed rows: the small model's and the head's learning rate")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    parser.add_argument("--out", help="report folder (default reports/<task>)")
    parser.add_argument("--work", help="scratch folder for runs and state caches (default <out>/work)")
    parser.add_argument("--keep-runs", action="store_true", help="keep each composed row's checkpoints")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out = args.out or f"reports/{args.task}"
    args.work = args.work or str(Path(args.out) / "work")
    if args.row:  # child process: one row, one seed
        Path(args.json).write_text(json.dumps(run_row(args)))
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    started, results = time.perf_counter(), []
    child_args = [a for a in sys.argv[1:]]
    for seed in args.seeds:
        for row in args.rows:
            if row.endswith("zero_shot") and seed != args.seeds[0]:
                continue  # no training, greedy decoding, one test set: another seed would repeat it
            target = Path(args.work) / f"{row}-{seed}.json"
            if not target.is_file():  # finished rows are kept: rerunning the command continues
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, __file__, *child_args, "--row", row, "--seed", str(seed),
                                       "--json", str(target), "--out", args.out, "--work", args.work],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    results.append({"row": row, "seed": seed, "error": proc.stderr.strip().splitlines()[-1]
                                    if proc.stderr.strip() else f"exit {proc.returncode}"})
                    print(f"{row} seed {seed}: FAILED {results[-1]['error']}", flush=True)
                    continue
                print(f"{row} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
            results.append(json.loads(target.read_text()))
            write_report(args, results, time.perf_counter() - started)
    write_report(args, results, time.perf_counter() - started)
    print((Path(args.out) / "results.md").read_text())


if __name__ == "__main__":
    main()
