"""Default learning rates are per method, what our equal-time reports' grids picked, as docs/training.md
documents; the paper's are one flag away (issue 28, item 16)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llm_modules.entrypoints.cli import main
from llm_modules.training.config import (
    LEARNING_RATES,
    PAPER_LEARNING_RATES,
    TrainConfig,
)

DOCS = Path(__file__).parents[2] / "docs" / "training.md"


def documented() -> dict[str, tuple[float, float | None]]:
    """The docs' table of default learning rates: {method: (lr_small, lr_bridge or None)}."""
    rows = re.findall(r"^\| `(\w+)` \| ([\d.e-]+) \| ([\d.e-]+|\(none\)) \|", DOCS.read_text(), re.MULTILINE)
    return {method: (float(small), None if bridge == "(none)" else float(bridge)) for method, small, bridge in rows}


def config(**options) -> TrainConfig:
    return TrainConfig.from_flags(**{"large": "large", "small": "small", "data": "d.jsonl", "output": "out", **options})


@pytest.mark.parametrize("method", ["composed", "finetune", "lora", "distill"])
def test_each_methods_default_learning_rates_are_the_documented_ones(method):
    assert documented()[method] == LEARNING_RATES[method]
    small, bridge = LEARNING_RATES[method]
    chosen = config(method=method)
    assert chosen.train.lr_small == small and chosen.train.lr_bridge == (bridge or PAPER_LEARNING_RATES[1])
    paper = config(method=method, paper_lrs=True)
    assert (paper.train.lr_small, paper.train.lr_bridge) == PAPER_LEARNING_RATES == (5e-5, 1e-4)
    given = config(method=method, paper_lrs=True, lr_small=2e-3)  # a given rate wins over either default
    assert (given.train.lr_small, given.train.lr_bridge) == (2e-3, 1e-4)
    assert config(method=method).to_dict()["train"]["lr_small"] == small  # the saved run holds the value used


def test_the_composed_default_moves_validation_loss_more_than_the_papers(tiny_pair_with_tokenizer, tmp_path):
    """Same tiny models, data and steps: the measured default rates lower validation loss clearly more
    than the paper's, which barely move it."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i % 7} plus {i // 7}?",
                                        "completion": f"{i % 7 + i // 7}"}) + "\n" for i in range(40)))

    def moved(output: str, *extra: str) -> float:
        assert main(["train", "--large", tiny_pair_with_tokenizer["large"], "--small", tiny_pair_with_tokenizer["small"],
                     "--data", str(data), "--output", str(tmp_path / output), "--template", "stratos",
                     "--batch-size", "4", "--max-length", "512", "--max-steps", "8", "--eval-every", "8",
                     "--num-samples", "0", "--no-progress", "--dropout", "0", "--head", "new",
                     "--state-cache-dir", str(tmp_path / "states"), *extra]) == 0
        summary = json.loads((tmp_path / output / "summary.json").read_text())
        return summary["initial_val_loss"] - summary["best_val_loss"]

    default, paper = moved("default"), moved("paper", "--paper-lrs")
    assert default > 2 * paper > 0, (default, paper)
