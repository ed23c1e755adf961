"""benchmarks/speculative.py's accounting of a drafter's training seconds, everything included."""

from __future__ import annotations

import importlib.util
import json

from ..helpers import REPO


def load_script():
    spec = importlib.util.spec_from_file_location("speculative_benchmark", REPO / "benchmarks" / "speculative.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_reused_state_cache_is_charged_what_its_build_cost(tmp_path):
    runs = {"a": {"train_seconds": 600, "state_cache_seconds": 500, "state_cache_keys": ["k1", "k2"]},
            "b": {"train_seconds": 700, "state_cache_seconds": 0, "state_cache_keys": ["k1", "k2"]},
            "c": {"train_seconds": 650, "state_cache_seconds": 0, "state_cache_keys": ["k3"],
                  "target_generation_seconds": 40},
            "d": {"train_seconds": 100, "state_cache_seconds": 30, "state_cache_keys": ["k3"]}}
    folders = []
    for name, summary in runs.items():
        (tmp_path / name / "best").mkdir(parents=True)
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
        folders.append(tmp_path / name / "best")  # a run's best/ finds the summary above it
    (tmp_path / "e").mkdir()
    folders.append(tmp_path / "e")
    costs = load_script().training_costs(folders)
    assert [costs[f] for f in folders] == [1100.0, 1200.0, 720.0, 130.0, None]


def test_the_cache_builder_is_found_beside_the_drafters_given(tmp_path):
    """A drafter that reused a cache is charged its build even when the drafter that built it is not benchmarked."""
    for name, summary in {"builder": {"train_seconds": 300, "state_cache_seconds": 561, "state_cache_keys": ["k"]},
                          "reuser": {"train_seconds": 563, "state_cache_seconds": 0, "state_cache_keys": ["k"]},
                          "other": {"train_seconds": 5, "state_cache_seconds": 9, "state_cache_keys": ["z"]}}.items():
        (tmp_path / "runs" / name / "best").mkdir(parents=True)
        (tmp_path / "runs" / name / "summary.json").write_text(json.dumps(summary))
    folder = tmp_path / "runs" / "reuser" / "best"
    assert load_script().training_costs([folder]) == {folder: 1124.0}
