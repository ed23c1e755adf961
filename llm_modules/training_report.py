"""What a finished training run shows: the loss-curve PNG and answers to held-out questions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .answers import answers_match, extract_final_answer
from .data import TokenizedExample


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
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train", alpha=0.7)
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per answer token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True


def prompt_of(example: TokenizedExample) -> list[int]:
    """The example's tokens before its first answer token (the answer's prompt, template included)."""
    first = next((i for i, label in enumerate(example.labels) if label != -100), len(example.labels))
    return example.input_ids[:first]


@torch.no_grad()
def held_out_samples(model: Any, examples: list[TokenizedExample], max_new_tokens: int) -> list[dict[str, Any]]:
    """Greedy answers to held-out questions, printed beside the right ones."""
    samples = []
    for example in examples:
        ids = torch.tensor([prompt_of(example)], device=model.bridge.pre_proj.weight.device)
        out = model.generate(ids, max_new_tokens=max_new_tokens)
        text = model.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        predicted = extract_final_answer(text)
        record = example.record
        correct = (record.scorer(predicted) >= 1.0 if record.scorer and predicted is not None
                   else answers_match(predicted, record.reference))
        question = next(m["content"] for m in record.messages if m["role"] == "user")
        samples.append({"question": question, "reference": record.reference, "model_answer": text,
                        "extracted": predicted, "correct": bool(correct)})
        print(f"\nQ: {question}\nmodel: {text.strip()[:600]}\n-> extracted {predicted!r}, "
              f"reference {record.reference!r}: {'correct' if correct else 'wrong'}")
    return samples
