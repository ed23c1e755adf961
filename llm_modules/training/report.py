"""What a finished training run shows: the loss-curve PNG and answers to held-out questions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm_modules.data.prepare import TokenizedExample


def plot_losses(metrics: Path, png: Path) -> bool:
    """Training and validation loss against step; False when matplotlib or data is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    train = [r for r in rows if "loss" in r]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", alpha=0.7)
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
        ax.set_title(f"validation bits per byte of answer text: {val[0].get('val_bpb')} -> {val[-1].get('val_bpb')}",
                     fontsize=9)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per answer token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True


def held_out_samples(scorer: Any, examples: list[TokenizedExample], max_new_tokens: int) -> list[dict[str, Any]]:
    """Greedy answers of `scorer` (an `evaluate` adapter) to held-out questions, printed beside the right ones."""
    from llm_modules.evaluation.harness import EvalOptions, evaluate

    options = EvalOptions(max_new_tokens=max_new_tokens, num_samples=len(examples))
    samples = evaluate(scorer, examples, options)["samples"]
    for s in samples:
        verdict = {True: "correct", False: "wrong", None: "not checkable"}[s["correct"]]
        print(f"\nQ: {s['question']}\nmodel: {s['model_answer'].strip()[:600]}\n"
              f"-> extracted {s['extracted']!r}, reference {s['reference']!r}: {verdict}")
    return samples
