"""Training options: groups, one options class per method, and the run_config.json of older runs.

The fixtures tests/fixtures/run_config_v1_*.json were written by the code before the options were
grouped (flat, every option of every method), with LARGE, SMALL, DATA, OUTPUT and STATES standing
for the paths of a run made by `train_args` plus `--save-every 2`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_modules.entrypoints.cli import build_parser, main, train_config_from_args
from llm_modules.training.config import TrainConfig

from ..helpers import write_data

FIXTURES = Path(__file__).parents[1] / "fixtures"
PLACEHOLDERS = ("LARGE", "SMALL", "DATA", "OUTPUT", "STATES")
FLAGS = ["--template", "stratos", "--batch-size", "2", "--max-length", "512", "--max-steps", "6", "--eval-every", "3",
         "--num-samples", "1", "--max-new-tokens", "4", "--no-progress", "--dropout", "0.1", "--save-every", "2"]
EXTRA = {"composed": [], "lora": ["--method", "lora", "--lora-rank", "4"],
         "drafter": ["--method", "drafter", "--draft-tokens", "3", "--large-layers", "1,2"]}


def old_run_config(method: str, paths: dict[str, str]) -> dict:
    """The flat run_config.json the code before the grouping saved, its paths replaced by `paths`."""
    saved = json.loads((FIXTURES / f"run_config_v1_{method}.json").read_text())
    for key, value in saved.items():
        if value in paths:
            saved[key] = paths[value]
    return saved


def flags(paths: dict[str, str], *extra: str) -> list[str]:
    return ["train", "--large", paths["LARGE"], "--small", paths["SMALL"], "--data", paths["DATA"],
            "--output", paths["OUTPUT"], "--state-cache-dir", paths["STATES"], *FLAGS, *extra]


def from_flags(argv: list[str]) -> TrainConfig:
    return train_config_from_args(build_parser().parse_args(argv))


@pytest.mark.parametrize("method", sorted(EXTRA))
def test_an_old_flat_run_config_loads_as_the_same_run(method, tmp_path):
    paths = {name: name for name in PLACEHOLDERS}
    saved = old_run_config(method, paths)
    (tmp_path / "run_config.json").write_text(json.dumps(saved))
    loaded = TrainConfig.from_file(tmp_path / "run_config.json")
    given = from_flags(flags(paths, *EXTRA[method]))
    assert loaded == given
    assert given.differences(saved) == []  # the same run: --resume goes on
    changed = from_flags(flags(paths, *EXTRA[method], "--weight-decay", "0.5"))
    assert changed.differences(saved) == ["weight_decay"]
    resume_free = from_flags(flags(paths, *EXTRA[method], "--resume", "--progress"))
    assert resume_free.differences(saved) == []


def test_a_run_saved_before_the_grouping_resumes(tiny_pair_with_tokenizer, tmp_path, capsys):
    paths = {"LARGE": tiny_pair_with_tokenizer["large"], "SMALL": tiny_pair_with_tokenizer["small"],
             "DATA": write_data(tmp_path / "data.jsonl"), "OUTPUT": str(tmp_path / "run"),
             "STATES": str(tmp_path / "states")}
    assert main(flags(paths, "--max-steps", "2")) == 0
    # the run as the older code left it: its options flat, every method's
    saved = old_run_config("composed", paths)
    saved["max_steps"] = 2
    (tmp_path / "run" / "run_config.json").write_text(json.dumps(saved, indent=1))
    capsys.readouterr()
    assert main(flags(paths, "--max-steps", "2", "--lr-bridge", "0.001", "--resume")) == 2
    err = capsys.readouterr().err
    assert "different run" in err and "lr_bridge" in err
    assert main(flags(paths, "--max-steps", "4", "--resume")) == 2  # max_steps is no resume-free option
    assert main(flags(paths, "--max-steps", "2", "--resume")) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2
