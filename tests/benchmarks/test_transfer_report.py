"""The equal-time report harness end to end on tiny models: every row reports bits per byte, budgets
are honoured, finished units are reused only under identical options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers import REPO, build_chat_pair

SCRIPT = REPO / "benchmarks" / "transfer_report.py"


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, str]:
    return build_chat_pair(tmp_path_factory.mktemp("report_pair"))


def report(pair: dict[str, str], out: Path, *extra: str) -> tuple[dict, str]:
    pytest.importorskip("reasoning_gym")
    pytest.importorskip("peft")
    command = [sys.executable, str(SCRIPT), "--large", pair["large"], "--small", pair["small"],
               "--task", "spell_backward", "--train-size", "24", "--test-size", "4", "--template", "chat",
               "--max-new-tokens", "3", "--budget-seconds", "6",
               "--rows", "majority_answer", "large_zero_shot", "composed_residual", "small_finetuned", "lora_large",
               "--grid", "small_finetuned=1e-3", "lora_large=3e-3", "--row-budget", "composed_residual=10", "--seeds", "0", "--quiet-load", "0", "--out", str(out), *extra]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), proc.stdout


@pytest.mark.subprocess
def test_every_row_reports_bits_per_byte_within_its_budget_and_reruns_reuse(pair, tmp_path):
    results, log = report(pair, tmp_path / "r")
    rows = {r["row"]: r for r in results["rows"]}
    assert set(rows) == {"majority_answer", "large_zero_shot", "composed_residual", "small_finetuned", "lora_large"}
    for name, row in rows.items():
        assert row["error"] is None, (name, row["error"])
        assert set(row) >= {"row", "seed", "bits_per_byte", "accuracy", "train_seconds", "lr"}
        assert 0.0 <= row["accuracy"] <= 1.0
        if name != "majority_answer":
            assert row["bits_per_byte"] > 0
    for name in ("composed_residual", "small_finetuned", "lora_large"):  # timed after the warm-up steps
        calibration = results["calibration"][name]
        assert calibration["warmup_steps"] == 3 and len(calibration["timed_steps"]) == 4, calibration
    cache_seconds = results["caches"]["eca"]["cache_seconds"]
    assert cache_seconds > 0
    for name, budget in (("composed_residual", 10), ("small_finetuned", 6), ("lora_large", 6)):
        row = rows[name]
        # the budget in whole calibrated steps: off by at most half a step, however fast this machine is today
        detail = next(d for d in results["details"] if d["row"] == name)
        assert detail["budget_seconds"] == budget
        assert abs(row["train_seconds"] - budget) <= detail["sec_per_step"] / 2 + 0.05, (name, detail)
        assert row["steps"] >= 1 and row["wall_seconds"] > 0
    detail = next(d for d in results["details"] if d["row"] == "composed_residual")
    assert detail["overhead_seconds"] == cache_seconds  # the cache build counts against the composed row
    assert [t["fraction"] for t in detail["test"]] == [0.25, 0.5, 1.0]
    assert len(detail["test"][-1]["samples"]) == 4  # every sample kept
    assert sum(s["correct"] for s in detail["test"][-1]["samples"]) == detail["test"][-1]["correct"]
    # The composed row's learning rate went through its 3-point grid; the others were given one rate.
    assert [g["row"] for g in results["grid"]] == ["composed_residual"] * 3
    best = min(results["grid"], key=lambda g: g["best_val_bpb"])
    assert rows["composed_residual"]["lr"] == best["lr_small"] and rows["lora_large"]["lr"] == 3e-3
    md = (tmp_path / "r" / "results.md").read_text()
    assert "PARTIAL" not in md and "Time to reach lora_large" in md
    assert (tmp_path / "r" / "val_bpb_vs_seconds.png").stat().st_size > 1000

    again, log = report(pair, tmp_path / "r")
    assert "running" not in log  # every unit reused
    assert again["rows"] == results["rows"]
    changed, log = report(pair, tmp_path / "r", "--grid",
                          "small_finetuned=1e-3", "lora_large=1e-3")
    reran = {line.split("-")[1] for line in log.splitlines() if line.endswith(": running")}
    assert "lora" in "".join(reran) and not any("composed" in r or "small" in r for r in reran)
    assert {r["row"]: r for r in changed["rows"]}["lora_large"]["lr"] == 1e-3


def test_every_train_row_is_a_valid_training_config(monkeypatch):
    """A row's options are TrainConfig fields with valid values (a typo would fail only hours into a report)."""
    import importlib.util

    from llm_modules.training.config import TrainConfig

    spec = importlib.util.spec_from_file_location("transfer_report", SCRIPT)
    harness = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "transfer_report", harness)  # its dataclasses look themselves up
    spec.loader.exec_module(harness)
    for row, entry in harness.ROWS.items():
        if entry["kind"] == "train":
            config = TrainConfig.from_flags(large="l", small="s", data="d.jsonl", output="o", method=entry["method"],
                                            **entry["options"])
            assert all(config.as_flags()[k] == v for k, v in entry["options"].items()), row
    frozen = TrainConfig.from_flags(large="l", small="s", data="d.jsonl", output="o",
                                    **harness.ROWS["composed_ladder_frozen_small"]["options"])
    assert frozen.compose.options()["train_small"] is False


def test_a_timing_unit_names_its_machine_so_another_machine_times_anew(tmp_path, monkeypatch):
    """The state cache's build and the seconds per step are timings of one machine: resumed on another (here a CPU
    without bfloat16 instructions took 2.1x as long per distilled step), they are timed again, while units whose
    results do not depend on the machine's speed are keyed as before."""
    from types import SimpleNamespace

    from ..helpers import load_benchmark

    script = load_benchmark("transfer_report")
    args = SimpleNamespace(work=str(tmp_path), task="gsm_symbolic", task_args=[], train_size=8, test_size=4,
                           large="l", small="s", template="chat", max_length=64, batch_size=2, max_new_tokens=4,
                           eval_batch_size=2, accuracy_at=[1.0])
    plan = script.Plan(args)
    monkeypatch.setattr(script, "machine_name", lambda: "CPU only (x86_64, A, native bfloat16, 2 torch threads)")
    here = {phase: plan.unit(phase, "distilled", seed=0) for phase in ("calibrate", "grid", "run")}
    assert here["calibrate"]["machine"].startswith("CPU only") and "machine" not in here["run"]
    monkeypatch.setattr(script, "machine_name", lambda: "CPU only (x86_64, B, no bfloat16 instructions, 2 torch threads)")
    there = {phase: plan.unit(phase, "distilled", seed=0) for phase in ("calibrate", "grid", "run")}
    assert script.unit_key(there["calibrate"]) != script.unit_key(here["calibrate"])
    assert script.unit_key(there["run"]) == script.unit_key(here["run"])
    assert script.unit_key(there["grid"]) == script.unit_key(here["grid"])
