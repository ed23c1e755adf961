"""Equal-time knowledge-transfer report: the composed model against its rivals at the same training
seconds, in bits per byte of held-out answer text (the unit every tokenizer shares), every row
trained by the one loop (`llm_modules.training.loop`) with its learning rate picked the same way.

    python benchmarks/transfer_report.py --large qwen2.5-coder-1.5b-instruct --small smollm2-135m-instruct \\
        --task gsm_symbolic --train-size 120 --test-size 48 --budget-seconds 1200 --seeds 0 1 2 --out reports/x

How a row is run (each unit of work in its own process, so its memory and time are its own):
1. State cache (composed rows): the large model's states of the training examples are built once per
   task and timed; that time is counted against every composed row (not per learning rate or seed).
2. Calibration: each trainable row times a few of its own steps (after three warm-up steps) and turns the
   budget into a step count: steps = (budget - cache build, for composed rows) / seconds per step.
   From then on a row is a fixed number of steps, reproducible from its seed, whatever else the
   machine runs: `train_seconds` is that calibrated time, `wall_seconds` what the clock said.
3. Learning rates: every trainable row tries each rate of its grid (3 values spanning 10x) on the
   first seed, by default for the whole budget (so the winner's run is also that seed's full run;
   `--grid-seconds` gives shorter grid runs instead); the lowest validation bits per byte wins.
4. Full runs: the winner trains for the whole budget, once per seed. The training examples are the
   same for every seed (a seed changes the initialisation and the batch order). Held-out test bits
   per byte and accuracy are measured at 25%, 50% and 100% of the budget; validation bits per byte
   at 20 points along the way, for the curves.
Zero-shot rows (no training) and `majority_answer` (no model: always the training data's most common
answer, the accuracy floor) run once. The held-out test set is generated with seed 10000, which no
training set uses.

A rerun with the same options continues where the last one stopped: a finished unit is reused only
when everything that shapes it is the same (models, data, learning rate, steps, row options, seed and
a digest of the library's code); an interrupted training run resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TRAIN_SEED = 0  # the training examples, the same for every run seed
TEST_SEED = 10_000  # the held-out test set: one for every row and seed, disjoint from the training data
FRACTIONS = (0.25, 0.5, 1.0)  # of the budget, where the test set is scored
VAL_POINTS = 20  # validation evaluations per full run (the curves)
CALIBRATION_STEPS = 4  # timed steps, after CALIBRATION_WARMUP untimed ones
CALIBRATION_WARMUP = 3  # on a GPU the first steps pay for lazy kernel loading and allocator growth: an H100
# timed a tiny pair's steps 2 to 5 at 1.58, 1.16, 0.14 and 0.03 s after a single warm-up step
STEADY = 2.0  # a calibration whose slowest step takes this many times its fastest was disturbed: retried
QUIET_ENV = "TRANSFER_REPORT_QUIET_LOAD"  # calibration's load-average limit, from --quiet-load

# Learning-rate grids, each 3 values spanning 10x, as (lr_small, lr_bridge) pairs; see TrainConfig
# for what each rate applies to in each method.
GRIDS = {
    "composed": [(1e-4, 2e-4), (3e-4, 6e-4), (1e-3, 2e-3)],  # small side and head; bridge 2x (the paper's ratio)
    "finetune": [(3e-5, 0.0), (1e-4, 0.0), (3e-4, 0.0)],
    "lora": [(1e-4, 0.0), (3e-4, 0.0), (1e-3, 0.0)],
    "distill": [(1e-4, 1e-3), (3e-4, 3e-3), (1e-3, 1e-2)],  # student body; its new embeddings 10x
}
# row -> what it is. "train" rows name a TrainConfig method and options.
ROWS = {
    "majority_answer": {"kind": "majority"},
    "large_zero_shot": {"kind": "zero_shot", "model": "large"},
    "small_zero_shot": {"kind": "zero_shot", "model": "small"},
    "composed_residual": {"kind": "train", "method": "composed", "options": {"head": "residual"}},
    "composed_new": {"kind": "train", "method": "composed", "options": {"head": "new"}},
    "composed_projected": {"kind": "train", "method": "composed", "options": {"head": "projected"}},
    # bridges beyond the paper (llm_modules/bridges/), the small model keeping its own embeddings
    "composed_eca_mapped": {"kind": "train", "method": "composed",
                            "options": {"head": "residual", "small_inputs": "mapped"}},
    "composed_ladder": {"kind": "train", "method": "composed",
                        "options": {"head": "residual", "bridge": "ladder", "small_inputs": "mapped"}},
    "composed_xattn": {"kind": "train", "method": "composed",
                       "options": {"head": "residual", "bridge": "xattn", "small_inputs": "mapped"}},
    # CALM's setting: the small model frozen too, only the ladder's taps and the head train
    "composed_ladder_frozen_small": {"kind": "train", "method": "composed",
                                     "options": {"head": "residual", "bridge": "ladder", "small_inputs": "mapped",
                                                 "train_small": False}},
    # issue 26: the large model reads the prompt only, the small side decodes alone (the head cannot be
    # residual there: the large model's logits at answer positions do not exist; projected keeps its frozen head)
    "composed_eca_prompt": {"kind": "train", "method": "composed",
                            "options": {"head": "projected", "small_inputs": "mapped", "large_reads": "prompt"}},
    "composed_xattn_prompt": {"kind": "train", "method": "composed",
                              "options": {"head": "projected", "bridge": "xattn", "small_inputs": "mapped",
                                          "large_reads": "prompt"}},
    # issue 39: the same, the small model answering in its own tokenizer through its own head (starts as the small
    # model alone: the gates start closed)
    "composed_own_xattn_prompt": {"kind": "train", "method": "composed",
                                  "options": {"head": "own", "bridge": "xattn", "large_reads": "prompt"}},
    "composed_own_ladder_prompt": {"kind": "train", "method": "composed",
                                   "options": {"head": "own", "bridge": "ladder", "large_reads": "prompt"}},
    "small_finetuned": {"kind": "train", "method": "finetune", "options": {}},
    "lora_large": {"kind": "train", "method": "lora", "options": {"lora_rank": 8}},
    "distilled": {"kind": "train", "method": "distill", "options": {}},
}
HEADLINE = ["composed_residual", "lora_large", "small_finetuned"]
DEFAULT_ROWS = ["majority_answer", "large_zero_shot", "small_zero_shot", *HEADLINE]
RIVAL = "lora_large"  # the composed rows' target: its final validation bits per byte


# ----------------------------------------------------------------------------- specs and keys
def data_specs(args: argparse.Namespace) -> tuple[str, str]:
    extra = "".join(f"&{kv}" for kv in args.task_args)
    return (f"reasoning-gym:{args.task}?size={args.train_size}&seed={TRAIN_SEED}{extra}",
            f"reasoning-gym:{args.task}?size={args.test_size}&seed={TEST_SEED}{extra}")


def code_digest() -> str:
    """sha256 of the library's source: a finished unit is reused only under the same code."""
    import llm_modules

    h = hashlib.sha256()
    for path in sorted(Path(llm_modules.__file__).parent.rglob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


# units whose result is a timing (the state cache's build, seconds per step): their keys name the machine
TIMED_PHASES = ("cache", "calibrate")


def machine_name() -> str:
    """The machine a timing ran on, with its torch threads (on a CPU without bfloat16 instructions a distilled step
    here took 44.9 s, against 21.0 s on the CPU of the earlier reports: their budgets are not the same work)."""
    import torch

    from llm_modules.devices import machine_description

    return f"{machine_description()}, {torch.get_num_threads()} torch threads"


def unit_key(unit: dict) -> str:
    return hashlib.sha256(json.dumps(unit, sort_keys=True).encode()).hexdigest()[:16]


def train_config(unit: dict, output: Path, **over):
    """The TrainConfig of a training unit (cache, calibration, grid or full run)."""
    from llm_modules.training.config import TrainConfig

    return TrainConfig.from_flags(**{
        "large": unit["large"], "small": unit["small"], "data": unit["train_data"], "output": str(output),
        "method": ROWS[unit["row"]]["method"], **ROWS[unit["row"]]["options"], "template": unit["template"],
        "max_length": unit["max_length"], "batch_size": unit["batch_size"], "seed": unit.get("seed", 0),
        "data_seed": TRAIN_SEED, "lr_small": unit.get("lr_small") or 1e-4, "lr_bridge": unit.get("lr_bridge") or 1e-4,
        "num_samples": 0, "progress": False, "early_stopping_patience": 0, "state_cache_dir": unit["states"],
        **over,
    })


# ----------------------------------------------------------------------------- child: one unit
def test_examples(unit: dict, scorer) -> list:
    from llm_modules.data.prepare import DataConfig
    from llm_modules.evaluation.harness import held_out_examples

    return held_out_examples(DataConfig(spec=unit["test_data"], template=unit["template"],
                                        max_length=unit["max_length"]), scorer.tokenizer, scorer.max_positions, "all")


def score_test(unit: dict, scorer, keep_samples: bool, generate: bool = True) -> dict:
    """Held-out bits per byte, and (when `generate`) accuracy of greedy answers, every sample kept."""
    from llm_modules.evaluation.harness import EvalOptions, evaluate

    result = evaluate(scorer, test_examples(unit, scorer), EvalOptions(
        split="all", max_new_tokens=unit["max_new_tokens"], batch_size=unit["eval_batch_size"],
        num_samples=-1 if keep_samples else 0, generate=generate))
    out = {k: result.get(k) for k in ("bits_per_byte", "accuracy", "correct", "checked", "loss", "examples",
                                      "answer_bytes", "seconds")}
    if keep_samples:
        out["samples"] = result["samples"]
    return out


def run_cache(unit: dict, scratch: Path) -> dict:
    """Build the state cache of the training examples and time it, alone (retried once if the machine got busy)."""
    import torch

    from llm_modules.training.loop import setup

    quiet, threads = float(os.environ.get(QUIET_ENV, "1.0")), torch.get_num_threads()
    if Path(unit["states"]).exists():
        raise RuntimeError(f"the state cache in {unit['states']} exists already, so its build cannot be timed; "
                           "delete that folder and rerun")
    for attempt in range(2):
        load_before = wait_until_quiet(quiet)
        run = setup(train_config(unit, scratch, max_steps=1))
        load_after = os.getloadavg()[0]
        if quiet <= 0 or load_after < threads + quiet or attempt == 1:
            break
        shutil.rmtree(unit["states"])  # timed on a busy machine: build it again
        shutil.rmtree(scratch, ignore_errors=True)
    caches = [c for c in run.objective.states.values() if c is not None]
    return {"cache_seconds": run.objective.cache_seconds, "cache_mib": round(sum(c.size_bytes for c in caches) / 2**20, 1),
            "load_before": round(load_before, 2), "load_after": round(load_after, 2), "attempts": attempt + 1,
            "data": run.data.report}


def wait_until_quiet(limit: float) -> float:
    """Wait until the 1-minute load average is below `limit` (0: no wait), so a timing runs alone; returns it."""
    waited = 0
    while limit > 0 and os.getloadavg()[0] >= limit:
        if waited % 600 == 0:
            print(f"timing waits for a quiet machine (load {os.getloadavg()[0]:.1f}, limit {limit})", flush=True)
        time.sleep(15)
        waited += 15
    return os.getloadavg()[0]


def run_calibration(unit: dict, scratch: Path) -> dict:
    """Seconds per optimizer step of this row, timed alone: the machine must be quiet before (load
    below --quiet-load) and stay so (below this process's threads + that), and the timed steps must
    agree (the slowest under STEADY x the fastest), else the timing is retried."""
    import torch

    from llm_modules.training.loop import train

    warmup, threads = unit["warmup_steps"], torch.get_num_threads()
    quiet = float(os.environ.get(QUIET_ENV, "1.0"))
    for attempt in range(3):
        load_before = wait_until_quiet(quiet)
        shutil.rmtree(scratch, ignore_errors=True)
        train(train_config(unit, scratch, max_steps=warmup + CALIBRATION_STEPS, eval_every=10**6))
        load_after = os.getloadavg()[0]
        times = [r["time"] for r in map(json.loads, (scratch / "metrics.jsonl").read_text().splitlines()) if "time" in r]
        timed = times[warmup - 1:]  # from the end of the last warm-up step
        per_step = [round(b - a, 3) for a, b in zip(timed, timed[1:])]
        if quiet <= 0 or (load_after < threads + quiet and max(per_step) < STEADY * min(per_step)):
            break
    return {"sec_per_step": round(statistics.mean(per_step), 4), "timed_steps": per_step,
            "load_before": round(load_before, 2), "load_after": round(load_after, 2), "attempts": attempt + 1}


def run_training(unit: dict, output: Path) -> dict:
    """A grid point or a full run: `steps` optimizer steps, test scores at FRACTIONS of them (full runs)."""
    import torch

    from llm_modules.training.loop import train

    steps, full = unit["steps"], unit["phase"] == "run"
    step_of = {f: max(1, round(f * steps)) for f in FRACTIONS} if full else {}
    marks = set(step_of.values())
    scores_path = output / "test_scores.json"
    scores = json.loads(scores_path.read_text()) if scores_path.is_file() else {}

    def on_step(run, step):
        if step not in marks or str(step) in scores:
            return
        objective = run.objective
        fraction = max(f for f, s in step_of.items() if s == step)
        accuracy = fraction in unit.get("accuracy_at", FRACTIONS)
        scores[str(step)] = {"step": step, **score_test(unit, objective.scorer(), step == steps, generate=accuracy)}
        scores_path.write_text(json.dumps(scores))
        if getattr(objective, "released", False):
            objective.model.release_large()  # scoring reloaded it to generate; training needs it no more
        run.wrapped.train()

    started = time.perf_counter()
    config = train_config(unit, output, max_steps=steps, eval_every=max(1, steps // (VAL_POINTS if full else 4)),
                          save_every=max(1, steps // 5), keep_checkpoints=1,
                          resume=(output / "run_config.json").is_file())
    summary = train(config, on_step=on_step)
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    val = [(r["step"], r["val_bpb"]) for r in rows if "val_bpb" in r]
    out = {"steps": summary["steps"], "best_val_bpb": summary["best_val_bpb"], "final_val_bpb": val[-1][1],
           "val_curve": val, "trainable": summary["parameters"]["total"]["trainable"],
           "wall_seconds": round(time.perf_counter() - started, 1), "train_loss_curve": [r["loss"] for r in rows if "loss" in r],
           "data": summary["data"], "device": "cuda:" + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if full:
        out["test"] = [{**scores[str(step_of[f])], "fraction": f} for f in FRACTIONS]
    return out


def run_zero_shot(unit: dict) -> dict:
    import torch

    from llm_modules.evaluation.harness import PlainScorer
    from llm_modules.models.specs import resolve_model

    loaded = resolve_model(unit[ROWS[unit["row"]]["model"]])
    if torch.cuda.is_available():
        loaded.model.to("cuda")
    scored = score_test(unit, PlainScorer(loaded.model, loaded.tokenizer), keep_samples=True)
    return {"test": [{"fraction": 0.0, **scored}], "trainable": 0, "steps": 0,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def run_unit(unit: dict, scratch: Path) -> dict:
    phase = unit["phase"]
    if phase == "cache":
        return run_cache(unit, scratch)
    if phase == "calibrate":
        return run_calibration(unit, scratch)
    if phase in ("grid", "run"):
        return run_training(unit, scratch)
    if phase == "zero_shot":
        return run_zero_shot(unit)
    raise ValueError(phase)


def majority_answer(unit: dict) -> dict:
    """Always the training data's most common answer: the accuracy a trained row must clear."""
    from collections import Counter
    from types import SimpleNamespace

    from llm_modules.data.sources import load_records
    from llm_modules.evaluation.harness import is_correct

    counts = Counter(r.reference for r in load_records(unit["train_data"]) if r.reference is not None)
    guess = counts.most_common(1)[0][0]
    verdicts = [v for r in load_records(unit["test_data"])
                if (v := is_correct(SimpleNamespace(record=r), guess, guess)) is not None]
    return {"answer": guess, "trainable": 0, "steps": 0,
            "test": [{"fraction": 0.0, "accuracy": round(sum(verdicts) / len(verdicts), 4), "bits_per_byte": None,
                      "examples": len(verdicts)}]}


# ----------------------------------------------------------------------------- parent: the plan
class Plan:
    """Runs units in child processes, reusing finished ones, and keeps every result."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.work = args, Path(args.work)
        (self.work / "units").mkdir(parents=True, exist_ok=True)
        train_data, test_data = data_specs(args)
        self.base = {"large": args.large, "small": args.small, "train_data": train_data, "test_data": test_data,
                     "template": args.template, "max_length": args.max_length, "batch_size": args.batch_size,
                     "max_new_tokens": args.max_new_tokens, "eval_batch_size": args.eval_batch_size,
                     "code": code_digest()}
        # One state cache per code digest: its build is timed, so it is never silently reused across code.
        self.base["states"] = str(self.work / "states" / self.base["code"])
        self.started = time.perf_counter()

    def unit(self, phase: str, row: str, **fields) -> dict:
        unit = {**self.base, "phase": phase, "row": row, **fields}
        if phase in TIMED_PHASES:  # a timing holds for the machine it ran on only: another machine times anew
            unit["machine"] = machine_name()
        if phase == "run":
            unit["accuracy_at"] = sorted(self.args.accuracy_at)
        if ROWS[row]["kind"] == "train":
            unit["options"] = ROWS[row]["options"]
        if ROWS[row].get("method") == "composed":  # rows tapping the same large layers share one state cache
            unit["states"] = f"{self.base['states']}/{cache_group(row)}"
        return unit

    def run(self, unit: dict) -> dict:
        key = unit_key(unit)
        name = f"{unit['phase']}-{unit['row']}-{unit.get('seed', '')}-{key}"
        target = self.work / "units" / f"{name}.json"
        if target.is_file():
            return json.loads(target.read_text())
        if unit["phase"] == "majority":
            result = majority_answer(unit)
        else:
            spec = self.work / "units" / f"{name}.spec.json"
            spec.write_text(json.dumps(unit, indent=1))
            t0 = time.perf_counter()
            print(f"{name}: running", flush=True)
            proc = subprocess.run([sys.executable, __file__, "--unit", str(spec)], stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
                print(f"{name}: FAILED {tail}", flush=True)
                (self.work / "units" / f"{name}.stderr").write_text(proc.stderr)
                return {"error": tail}
            result = json.loads(Path(str(spec).replace(".spec.json", ".out.json")).read_text())
            print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
        result = {**unit, **result, "finished": datetime.datetime.now().isoformat(timespec="seconds")}
        target.write_text(json.dumps(result, indent=1))
        return result


def cache_group(row: str) -> str:
    """Composed rows whose large-model states are the same (same bridge and taps) share a cache: its name."""
    options = ROWS[row]["options"]
    taps = {k: options[k] for k in ("bridge", "large_layers", "large_reads") if k in options}
    return "eca" if not taps else hashlib.sha256(json.dumps(taps, sort_keys=True).encode()).hexdigest()[:8]


def budget_of(args: argparse.Namespace, row: str) -> float:
    return float(args.row_budget.get(row, args.budget_seconds))


def execute(args: argparse.Namespace) -> dict:
    """Every unit of the report in order, writing the report after each finished one."""
    plan = Plan(args)
    state: dict = {"rows": [], "grid": [], "calibration": {}, "caches": {}}
    train_rows = [r for r in args.rows if ROWS[r]["kind"] == "train"]

    def checkpoint_report():
        write_report(args, state, time.perf_counter() - plan.started)

    for row in args.rows:
        kind = ROWS[row]["kind"]
        if kind in ("majority", "zero_shot"):
            result = plan.run(plan.unit(kind, row))
            state["rows"].append({"row": row, "seed": None, **result})
            checkpoint_report()
    caches = state["caches"]  # cache group -> its timed build (the head does not change the states)
    for row in train_rows:
        if ROWS[row]["method"] == "composed" and cache_group(row) not in caches:
            caches[cache_group(row)] = plan.run(plan.unit("cache", row))
            checkpoint_report()
    for row in train_rows:
        cache = caches.get(cache_group(row), {}) if ROWS[row]["method"] == "composed" else {}
        if "error" in cache:  # no timed state cache: the row cannot be charged for it
            state["calibration"][row] = {"error": f"state cache: {cache['error']}"}
            continue
        state["calibration"][row] = plan.run(plan.unit("calibrate", row, lr_small=GRIDS[ROWS[row]["method"]][0][0],
                                                       lr_bridge=GRIDS[ROWS[row]["method"]][0][1] or None,
                                                       warmup_steps=CALIBRATION_WARMUP))
        checkpoint_report()

    def budget_steps(row: str) -> tuple[int, float]:
        """Steps of `row` in its budget, and the seconds counted before its first step (the cache build)."""
        overhead = (caches[cache_group(row)].get("cache_seconds") or 0.0) if ROWS[row]["method"] == "composed" else 0.0
        return round((budget_of(args, row) - overhead) / state["calibration"][row]["sec_per_step"]), overhead

    winners = {}
    for row in train_rows:
        calibration = state["calibration"][row]
        if "error" in calibration or budget_steps(row)[0] < 1:
            continue
        grid = args.grid.get(row) or GRIDS[ROWS[row]["method"]]
        # At the full budget (the default) a grid point IS the first seed's full run at that rate, so
        # the winner's run is reused as that seed's; a shorter grid budget gives separate short runs.
        at_budget = args.grid_seconds is None
        phase, grid_steps = ("run", budget_steps(row)[0]) if at_budget else \
            ("grid", max(1, int(args.grid_seconds / calibration["sec_per_step"])))
        scored = []
        for lr_small, lr_bridge in grid if len(grid) > 1 else []:
            result = plan.run(plan.unit(phase, row, seed=args.seeds[0], lr_small=lr_small, lr_bridge=lr_bridge or None,
                                        steps=grid_steps))
            state["grid"].append({"row": row, **result})
            if "error" not in result:
                scored.append((result["best_val_bpb"], lr_small, lr_bridge))
            checkpoint_report()
        winners[row] = min(scored)[1:] if scored else grid[0]
    for seed in args.seeds:
        for row in train_rows:
            calibration = state["calibration"][row]
            if "error" in calibration:
                state["rows"].append({"row": row, "seed": seed, "error": calibration["error"]})
                continue
            steps, overhead = budget_steps(row)
            if steps < 1:
                state["rows"].append({"row": row, "seed": seed, "error": f"the budget leaves no step after the state "
                                                                          f"cache build ({overhead:.1f} s)"})
                continue
            lr_small, lr_bridge = winners[row]
            result = plan.run(plan.unit("run", row, seed=seed, lr_small=lr_small, lr_bridge=lr_bridge or None, steps=steps))
            if "error" not in result:
                per_step = calibration["sec_per_step"]
                result["sec_per_step"] = per_step
                result["overhead_seconds"] = overhead
                result["train_seconds"] = round(overhead + steps * per_step, 1)
                result["budget_seconds"] = budget_of(args, row)
                for score in result["test"]:
                    score["train_seconds"] = round(overhead + score["fraction"] * steps * per_step, 1)
                result["val_curve_seconds"] = [(round(overhead + s * per_step, 1), bpb) for s, bpb in result["val_curve"]]
            state["rows"].append({"row": row, "seed": seed, **result})
            checkpoint_report()
    checkpoint_report()
    return state


# ----------------------------------------------------------------------------- the report
def fmt(values: list, digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def flat_rows(state: dict) -> list[dict]:
    """The interface rows: one per (row, seed) with its final test scores."""
    out = []
    for r in state["rows"]:
        final = (r.get("test") or [{}])[-1]
        out.append({"row": r["row"], "seed": r.get("seed"), "bits_per_byte": final.get("bits_per_byte"),
                    "accuracy": final.get("accuracy"), "train_seconds": r.get("train_seconds", 0.0),
                    "wall_seconds": r.get("wall_seconds"), "lr": r.get("lr_small"), "lr_bridge": r.get("lr_bridge"),
                    "steps": r.get("steps"), "error": r.get("error")})
    return out


def time_to_reach(curve: list, target: float) -> float | None:
    """First training second at which a (seconds, bpb) curve reaches `target` (linear between points)."""
    for (s0, b0), (s1, b1) in zip(curve, curve[1:]):
        if b0 <= target:
            return s0
        if b1 <= target:
            return s0 + (s1 - s0) * (b0 - target) / (b0 - b1)
    return curve[-1][0] if curve and curve[-1][1] <= target else None


def write_report(args: argparse.Namespace, state: dict, wall: float) -> None:
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    rows = flat_rows(state)
    by_row: dict[str, list[dict]] = {}
    for r in state["rows"]:
        by_row.setdefault(r["row"], []).append(r)
    done = {r["row"] for r in state["rows"] if "error" not in r}
    expected_runs = len(args.seeds) * sum(ROWS[r]["kind"] == "train" for r in args.rows)
    finished_runs = sum(1 for r in state["rows"] if r.get("seed") is not None and "error" not in r)
    partial = finished_runs < expected_runs
    train_data, test_data = data_specs(args)
    import torch

    device = machine_name()
    lines = [f"# {args.task}: equal training time, composed model vs rivals" + (" (PARTIAL)" if partial else ""), ""]
    if partial:
        lines += [f"**Partial**: {finished_runs} of {expected_runs} full runs have finished; rerun the command to "
                  "continue (finished units are reused).", ""]
    lines += [f"Command: `python {' '.join(sys.argv)}`  ",
              f"Machine: {device}, torch {torch.__version__}; {datetime.date.today()}; code digest "
              f"`{code_digest()}`; this invocation {wall / 60:.1f} min of wall time.  ",
              f"Large `{args.large}`, small `{args.small}`. Training data `{train_data}` (the same for every "
              f"seed), held-out test data `{test_data}`; template `{args.template}`, max length {args.max_length}, "
              f"batch {args.batch_size}, greedy decoding up to {args.max_new_tokens} new tokens. Seeds {args.seeds}. "
              f"Accuracy measured at {', '.join(f'{f:.0%}' for f in sorted(args.accuracy_at))} of the budget "
              "(bits per byte at 25%, 50% and 100%).  ",
              f"Budget: {args.budget_seconds:.0f} training seconds per row"
              + "".join(f", {r} {s:.0f} s" for r, s in args.row_budget.items()) + "; learning-rate grid "
              + ("at the full budget on the first seed (the winner's run is that seed's)" if args.grid_seconds is None
                 else f"{args.grid_seconds:.0f} s per point") + ".", ""]
    for group, cache in state["caches"].items():
        users = ", ".join(r for r in args.rows if ROWS[r].get("method") == "composed" and cache_group(r) == group)
        lines += [f"State cache `{group}` ({users}): " + (f"failed: {cache['error']}" if "error" in cache else
                  f"built in {cache['cache_seconds']:.1f} s ({cache['cache_mib']} MiB), counted in the training "
                  "time of each row that reads it."), ""]
    lines += ["## Held-out test set at 25%, 50% and 100% of the budget",
              "", "Bits per byte of the answer text (lower is better) | accuracy with the task's own scorer. "
              "Mean ± sd over seeds.", "",
              "| row | n | lr (small side / bridge) | steps | train s (wall s) | 25% | 50% | 100% | trainable |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in [r for r in ROWS if r in by_row]:
        rs = [r for r in by_row[row] if "error" not in r]
        errors = [r for r in by_row[row] if "error" in r]
        if not rs:
            lines.append(f"| {row} | 0 | failed: {errors[0]['error'][:100]} | | | | | | |")
            continue
        cells = []
        for i, fraction in enumerate(FRACTIONS):
            if ROWS[row]["kind"] != "train":
                cells.append("" if fraction < 1 else
                             f"{fmt([r['test'][0].get('bits_per_byte') for r in rs])} \\| {fmt([r['test'][0].get('accuracy') for r in rs])}")
                continue
            scores = [r["test"][i] for r in rs if len(r.get("test", [])) > i]
            cells.append(f"{fmt([s.get('bits_per_byte') for s in scores])} \\| {fmt([s.get('accuracy') for s in scores])}")
        lr = (f"{rs[0].get('lr_small'):g} / {rs[0].get('lr_bridge'):g}" if rs[0].get("lr_bridge") else
              f"{rs[0].get('lr_small'):g}") if rs[0].get("lr_small") else ""
        note = f" (always {rs[0]['answer']!r})" if row == "majority_answer" else ""
        seconds = (f"{fmt([r['train_seconds'] for r in rs], 0)} ({fmt([r['wall_seconds'] for r in rs], 0)})"
                   if ROWS[row]["kind"] == "train" else "")
        lines.append(f"| {row}{note} | {len(rs)} | {lr} | {rs[0].get('steps', 0)} | {seconds} | {' | '.join(cells)} "
                     f"| {rs[0].get('trainable', 0):,} |")
    rival = [r for r in by_row.get(RIVAL, []) if "error" not in r]
    if rival:
        target = statistics.mean(r["final_val_bpb"] for r in rival)
        lines += ["", f"## Time to reach {RIVAL}'s final validation bits per byte ({target:.4f})", "",
                  "| row | seconds to reach it (per seed) | its budget |", "|---|---|---|"]
        for row in [r for r in by_row if r.startswith("composed")]:
            rs = [r for r in by_row[row] if "error" not in r]
            reached = [time_to_reach(r["val_curve_seconds"], target) for r in rs]
            cells = ", ".join("not reached" if t is None else f"{t:.0f} s" for t in reached)
            lines.append(f"| {row} | {cells} | {rs[0]['budget_seconds']:.0f} s |" if rs else f"| {row} | | |")
    if state["calibration"]:
        lines += ["", f"## Calibration (seconds per optimizer step, timed alone, after {CALIBRATION_WARMUP} warm-up steps)", "",
                  "| row | s / step | steps in the budget |", "|---|---|---|"]
        for row, cal in state["calibration"].items():
            if "error" in cal:
                lines.append(f"| {row} | failed: {cal['error'][:100]} | |")
                continue
            overhead = (state["caches"].get(cache_group(row), {}).get("cache_seconds") or 0.0
                        if ROWS[row]["method"] == "composed" else 0.0)
            lines.append(f"| {row} | {cal['sec_per_step']:.2f} | "
                         f"{max(0, round((budget_of(args, row) - overhead) / cal['sec_per_step']))} |")
    if state["grid"]:
        lines += ["", "## Learning-rate grid (validation bits per byte after the grid budget, first seed)", "",
                  "| row | lr small side | lr bridge / embeddings | steps | best val bits/byte |", "|---|---|---|---|---|"]
        for g in state["grid"]:
            lines.append(f"| {g['row']} | {g.get('lr_small', 0):g} | {g.get('lr_bridge') or '':} | {g.get('steps', '')} | "
                         f"{g.get('best_val_bpb', g.get('error', ''))} |")
    lines += ["", "Bits per byte = summed negative log-likelihood of the answer tokens (closing token included) / "
              "ln 2 / UTF-8 bytes of the answer text: the same unit whatever the tokenizer. Training seconds are "
              "calibrated (steps x seconds per step, plus the state cache build for composed rows) and exclude "
              "evaluation. `majority_answer` is the accuracy floor.", ""]
    (folder / "results.md").write_text("\n".join(lines))
    payload = {"task": args.task, "large": args.large, "small": args.small, "partial": partial, "device": device,
               "budget_seconds": args.budget_seconds, "rows": rows, "grid": state["grid"],
               "calibration": state["calibration"], "caches": state["caches"], "details": state["rows"]}
    (folder / "results.json").write_text(json.dumps(payload, indent=1))
    plot(folder, by_row, done)


def plot(folder: Path, by_row: dict, done: set) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for row, rs in by_row.items():
        rs = [r for r in rs if "error" not in r and r.get("val_curve_seconds")]
        if not rs:
            continue
        length = min(len(r["val_curve_seconds"]) for r in rs)
        xs = [rs[0]["val_curve_seconds"][i][0] / 60 for i in range(length)]
        ys = [statistics.mean(r["val_curve_seconds"][i][1] for r in rs) for i in range(length)]
        ax.plot(xs, ys, "o-", markersize=3, label=f"{row} (n={len(rs)})")
    for row, rs in by_row.items():
        if row.endswith("zero_shot"):
            value = [r["test"][0].get("bits_per_byte") for r in rs if "error" not in r]
            if value and value[0] is not None:
                ax.axhline(value[0], linestyle=":", color="grey")
                ax.annotate(f"{row} (test)", (0, value[0]), fontsize=7, color="grey")
    ax.set_xlabel("training minutes (calibrated; composed rows start after the state cache build)")
    ax.set_ylabel("validation bits per byte of answer text")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "val_bpb_vs_seconds.png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line
def key_values(items: list[str], kind) -> dict:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in ROWS or not value:
            raise SystemExit(f"expected ROW=VALUE with ROW one of {', '.join(ROWS)}, got {item!r}")
        out[name] = kind(value)
    return out


def lr_pairs(text: str) -> list[tuple[float, float]]:
    """'1e-4:2e-4,3e-4:6e-4' -> [(1e-4, 2e-4), (3e-4, 6e-4)] (bridge rate optional)."""
    pairs = []
    for part in text.split(","):
        small, _, bridge = part.partition(":")
        pairs.append((float(small), float(bridge) if bridge else 0.0))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unit", help=argparse.SUPPRESS)  # child process: one unit of work
    parser.add_argument("--task", default="gsm_symbolic")
    parser.add_argument("--task-args", nargs="*", default=[], help="extra reasoning-gym options, key=value")
    parser.add_argument("--large", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--small", default="smollm2-135m-instruct")
    parser.add_argument("--train-size", type=int, default=120)
    parser.add_argument("--test-size", type=int, default=48)
    parser.add_argument("--template", default="chat")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--budget-seconds", type=float, default=1200.0, help="training seconds per row")
    parser.add_argument("--row-budget", nargs="*", default=[], metavar="ROW=SECONDS",
                        help="a different budget for some rows (stated in the report)")
    parser.add_argument("--grid-seconds", type=float, default=None,
                        help="training seconds per learning-rate grid point (default: the full budget, the grid "
                             "runs doubling as the first seed's runs)")
    parser.add_argument("--grid", nargs="*", default=[], metavar="ROW=LR[:LR_BRIDGE],...",
                        help="replace a row's learning-rate grid (one value: no grid search)")
    parser.add_argument("--accuracy-at", type=float, nargs="+", default=list(FRACTIONS), choices=FRACTIONS,
                        help="fractions of the budget where accuracy is measured too (greedy generation over the "
                             "test set; bits per byte is measured at every fraction)")
    parser.add_argument("--quiet-load", type=float, default=1.0,
                        help="calibration waits until the 1-minute load average is below this (0: never waits)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS))
    parser.add_argument("--out", help="report folder (default reports/<task>)")
    parser.add_argument("--work", help="scratch folder for units, runs and the state cache (default <out>/work)")
    args = parser.parse_args()
    if args.unit:
        spec = Path(args.unit)
        unit = json.loads(spec.read_text())
        scratch = spec.parent.parent / "runs" / spec.name.replace(".spec.json", "")
        scratch.mkdir(parents=True, exist_ok=True)
        result = run_unit(unit, scratch)
        Path(str(spec).replace(".spec.json", ".out.json")).write_text(json.dumps(result))
        shutil.rmtree(scratch, ignore_errors=True)  # checkpoints are GBs; the unit's JSON keeps what matters
        return
    os.environ[QUIET_ENV] = str(args.quiet_load)  # children inherit it; it shapes no result, so no unit key
    args.row_budget = key_values(args.row_budget, float)
    args.grid = key_values(args.grid, lr_pairs)
    args.out = args.out or f"reports/{args.task}"
    args.work = args.work or str(Path(args.out) / "work")
    execute(args)
    print((Path(args.out) / "results.md").read_text())


if __name__ == "__main__":
    main()
