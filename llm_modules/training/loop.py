"""Training loop on accelerate: `setup -> fit -> validate`, resumable, identical on 1 or N processes.

One optimizer step takes a length-grouped batch of `batch_size * processes * grad_accum`
examples (deterministic for (seed, epoch)), cut into `grad_accum` micro-steps of one global batch;
each process takes its slice of each. The loss is a sum over answer tokens divided by the step's token count
over ALL processes and micro-steps, so N processes give the same update as one process with the
same global batch (up to float rounding), and gradient accumulation gives the same update as a
larger batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file

from llm_modules.data.prepare import (
    PreparedData,
    TokenizedExample,
    answer_bytes,
    bits_per_byte,
    collate,
    examples_fingerprint,
    length_grouped_batches,
    pad_id,
    prepare_data,
)
from llm_modules.errors import LLMModulesError
from llm_modules.models.saved import RUN_CONFIG_FILE, RUN_MODELS, WEIGHTS_FILE
from llm_modules.tensors import IGNORE_INDEX
from llm_modules.training import checkpoint as ckpt
from llm_modules.training.config import TrainConfig
from llm_modules.training.objectives import Objective, build_objective
from llm_modules.training.report import held_out_samples, plot_losses
from llm_modules.training.run_lock import LOCK_FILE, RunLock, take_run_lock

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """What `setup` builds and `fit` uses."""

    config: TrainConfig
    accelerator: Accelerator
    objective: Objective  # the model and its loss (objectives.py); objective.module is unwrapped
    wrapped: Any  # what accelerate.prepare returned (DDP on several processes)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    data: PreparedData
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    output: Path
    data_fingerprint: str  # of the prepared examples: a resume on changed data is refused
    lock: RunLock | None = None  # the main process's hold on the output folder (run_lock.py)


def mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def check_output(output: Path, config: TrainConfig) -> None:
    """Refuse to write over a different run, or over this run's checkpoints without --resume.

    A folder that holds this run but nothing it trained (no checkpoint, no best/ nor last/: it failed
    before its first checkpoint) starts again without --resume."""
    saved = output / RUN_CONFIG_FILE
    if not saved.is_file():
        if output.is_dir() and any(p.name != LOCK_FILE for p in output.iterdir()) and not config.resume:
            raise LLMModulesError(f"output folder {output} is not empty and holds no llm-modules run; pick another --output")
        return
    try:
        previous = json.loads(saved.read_text())
    except json.JSONDecodeError:
        raise LLMModulesError(f"{saved} is corrupt; pick another --output") from None
    differing = config.differences(previous)
    if differing:
        raise LLMModulesError(
            f"output folder {output} holds a different run (differs in: {', '.join(differing)}); "
            "pick another --output, or repeat that run's options to --resume it"
        )
    # Main process, holding the folder's lock, before any process lists them: no writer is alive, so
    # interrupted swaps are finished here.
    trained = ckpt.recover_checkpoints(output / "checkpoints") or any((output / n).exists() for n in RUN_MODELS)
    if not config.resume and trained:
        raise LLMModulesError(f"output folder {output} already holds this run; add --resume to continue it")


def lr_lambda(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def forget_earlier_accelerator() -> None:
    """accelerate keeps one AcceleratorState per process and refuses a later Accelerator with another
    mixed precision or FSDP setting. A second `train` in one Python process (a notebook, a sweep,
    bf16 after float32) starts from a fresh one; launched processes (several) keep theirs."""
    from accelerate.state import AcceleratorState, PartialState

    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state()


def make_accelerator(config: TrainConfig) -> Accelerator:
    """DDP over the processes (default), or FSDP with --fsdp: only the trained parts are wrapped
    (objectives.TrainedParts), never the frozen large model."""
    forget_earlier_accelerator()
    launched, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
    if gpus and launched > gpus:  # accelerate would give each process a GPU of its own, beyond the last
        raise LLMModulesError(f"{launched} processes on this machine but {gpus} CUDA GPU(s): launch one process per "
                              f"GPU (--nproc_per_node {gpus}), or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on "
                              "the CPUs over gloo")
    plugin = None
    if config.hardware.fsdp:
        if not torch.cuda.is_available():
            raise LLMModulesError("--fsdp needs CUDA GPUs: accelerate shards with FSDP on GPUs only; on CPUs train "
                                  "without it (the trained parts are then replicated with DDP over gloo)")
        from accelerate import FullyShardedDataParallelPlugin

        # use_orig_params: the trained parts hold frozen tensors too (the small model's embedding stub);
        # full state dicts: best/, last/ and checkpoints hold whole tensors, as without FSDP.
        plugin = FullyShardedDataParallelPlugin(fsdp_version=1, use_orig_params=True, state_dict_type="FULL_STATE_DICT",
                                                auto_wrap_policy="transformer_based_wrap", cpu_ram_efficient_loading=False)
    # cpu=True on machines without CUDA lets accelerate see torchrun/accelerate-launch processes (gloo).
    return Accelerator(mixed_precision=mixed_precision(config.hardware.mixed_precision),
                       cpu=not torch.cuda.is_available(), fsdp_plugin=plugin)


def setup(config: TrainConfig) -> Run:
    """Everything `fit` needs. Every check comes before anything is written to the output folder, so
    a run refused for its options (or interrupted while the state cache builds) leaves the folder as
    it was, and the corrected run starts there. First of all the main process takes the folder's lock
    (`run_lock`: a folder that another live run holds is refused), let go if setup fails, else in `train`."""
    accelerator = make_accelerator(config)
    output = Path(config.output)
    lock = take_run_lock(output) if accelerator.is_main_process else None  # one run per folder, before any check
    try:
        return _setup(config, accelerator, output, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _setup(config: TrainConfig, accelerator: Accelerator, output: Path, lock: RunLock | None) -> Run:
    if accelerator.is_main_process:
        check_output(output, config)
    accelerator.wait_for_everyone()
    set_seed(config.train.seed)
    objective = build_objective(config, accelerator.device, accelerator.num_processes)
    objective.place(accelerator.device)
    data = prepare_data(config.data, objective.tokenizer, objective.max_positions,
                        objective.written_records(config, accelerator))
    if accelerator.is_main_process:
        print(f"data: {json.dumps(data.report)}")
    global_batch = config.train.batch_size * accelerator.num_processes
    steps_per_epoch = len(data.train) // (global_batch * config.train.grad_accum)
    if steps_per_epoch == 0:
        raise LLMModulesError(
            f"{len(data.train)} training examples are fewer than one optimizer step's "
            f"{global_batch * config.train.grad_accum} (batch size x processes x grad accum); lower them or add data"
        )
    objective.attach_data(config, data, accelerator)
    if accelerator.is_main_process:  # checked: now the folder holds this run
        output.mkdir(parents=True, exist_ok=True)
        (output / RUN_CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=1))
        (output / "data_report.json").write_text(json.dumps(data.report, indent=1))
        for name, text in objective.run_files().items():
            (output / name).write_text(text)
    accelerator.wait_for_everyone()

    total_steps = config.train.max_steps or steps_per_epoch * config.train.epochs
    optimizer = torch.optim.AdamW(objective.param_groups(config), weight_decay=config.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, int(config.train.warmup_ratio * total_steps))
    )
    wrapped, optimizer = accelerator.prepare(objective.module, optimizer)
    return Run(config, accelerator, objective, wrapped, optimizer, scheduler, data, global_batch, steps_per_epoch,
               total_steps, output, examples_fingerprint(data), lock)


def batch_tensors(run: Run, split: str, indices: list[int]) -> tuple[dict[str, Any], list[TokenizedExample]]:
    """Examples `indices` of `split` as device tensors (with whatever the objective adds), and the examples."""
    examples = [getattr(run.data, split)[i] for i in indices]
    batch = collate(examples, pad_id(run.objective.tokenizer))
    batch.update(run.objective.batch_extras(split, indices, batch["input_ids"].shape[1]))
    return {k: v.to(run.accelerator.device) for k, v in batch.items()}, examples


def loss_tokens(examples: list[TokenizedExample]) -> int:
    return sum(sum(1 for x in e.labels[1:] if x != IGNORE_INDEX) for e in examples)


@torch.no_grad()
def validate(run: Run) -> dict[str, float] | None:
    """Loss per answer token (cross-entropy, or the drafter's loss) and bits per byte of answer text
    (where the loss is the answer's cross-entropy) over the fixed validation split (all processes),
    plus val_<name> per answer token for the objective's other sums (`Objective.eval_sums`); None when
    there is no validation data."""
    if not run.data.val:
        return None
    run.wrapped.eval()
    acc, rank, world = run.accelerator, run.accelerator.process_index, run.accelerator.num_processes
    size = run.config.train.batch_size
    mine = list(range(rank, len(run.data.val), world))
    names: list[str] | None = None
    total: torch.Tensor | None = None  # tokens, bytes, then one sum per name
    # Every process runs the same number of forwards, those with fewer (or no) examples on a stand-in
    # batch whose result is dropped: FSDP gathers weights and DDP may sync buffers inside a forward,
    # and a process that skipped one would leave the others waiting for ever.
    most = -(-len(run.data.val) // world)  # examples of the process that holds the most
    for start in range(0, most, size):
        if start >= len(mine):
            batch, _ = batch_tensors(run, "val", [0])
            sums, examples = run.objective.eval_sums(run.wrapped, batch), []
        else:
            batch, examples = batch_tensors(run, "val", mine[start : start + size])
            sums = run.objective.eval_sums(run.wrapped, batch)
        names = names or list(sums)
        if total is None:
            total = torch.zeros(2 + len(names), dtype=torch.float64, device=acc.device)
        if examples:
            total += torch.tensor([loss_tokens(examples), sum(answer_bytes(e.record) for e in examples),
                                   *(float(sums[n]) for n in names)], dtype=torch.float64, device=acc.device)
    total = acc.reduce(total, reduction="sum")
    run.wrapped.train()
    tokens, n_bytes, sums = float(total[0]), int(total[1]), dict(zip(names, total[2:].tolist()))
    loss = sums.pop("loss")
    result = {"val_loss": round(loss / tokens, 5)}
    if run.objective.loss_is_answer_nll:
        result["val_bpb"] = round(bits_per_byte(loss, n_bytes), 5)
    result.update({f"val_{name}": round(value / tokens, 5) for name, value in sums.items()})
    return result


def train_step(run: Run, batches: list[list[int]]) -> float:
    """One optimizer step over `grad_accum` global batches; returns the mean loss per answer token."""
    acc, cfg = run.accelerator, run.config.train
    rank = acc.process_index
    step_tokens = sum(loss_tokens([run.data.train[i] for i in b]) for b in batches)
    loss_sum = 0.0
    for n, global_indices in enumerate(batches):
        batch, _ = batch_tensors(run, "train", global_indices[rank * cfg.batch_size : (rank + 1) * cfg.batch_size])
        last = n == len(batches) - 1
        with nullcontext() if last else acc.no_sync(run.wrapped):
            loss = run.objective.loss_sum(run.wrapped, batch)
            acc.backward(loss * (acc.num_processes / step_tokens))
        loss_sum += loss.item()
    if cfg.max_grad_norm > 0:
        acc.clip_grad_norm_(run.wrapped.parameters(), cfg.max_grad_norm)  # FSDP: the sharded norm
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    total = acc.reduce(torch.tensor([loss_sum], dtype=torch.float64, device=acc.device), reduction="sum")
    return float(total[0]) / step_tokens


def _full_state(run: Run, optimizer: bool = True
                ) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | torch.optim.Optimizer]:
    """(weights, optimizer) to write: under FSDP the whole tensors gathered on the main process (every
    process takes part), else (None, the optimizer) since the module holds them whole already."""
    if not run.config.hardware.fsdp:
        return None, run.optimizer
    from torch.distributed.checkpoint import state_dict as dcp

    options = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
    if not optimizer:
        return dcp.get_model_state_dict(run.wrapped, options=options), run.optimizer
    return dcp.get_state_dict(run.wrapped, run.optimizer, options=options)


def save_model(run: Run, folder: Path) -> None:
    """best/ or last/ (called by every process: FSDP gathers the weights first)."""
    weights, _ = _full_state(run, optimizer=False)
    if run.accelerator.is_main_process:
        run.objective.save_pretrained(folder, weights)


def save_checkpoint(run: Run, step: int, state: dict[str, Any]) -> None:
    acc = run.accelerator
    tmp = ckpt.temporary_folder(run.output / "checkpoints", step)
    opt_meta = None
    weights, optimizer = _full_state(run)
    if acc.is_main_process:
        opt_meta = ckpt.write_weights_and_optimizer(tmp, run.objective, optimizer, weights)
    acc.wait_for_everyone()
    ckpt.write_rng(tmp, acc.process_index)
    acc.wait_for_everyone()
    if acc.is_main_process:
        scaler = acc.scaler.state_dict() if acc.scaler is not None else None  # fp16 loss scale
        full = {**state, "optimizer": opt_meta, "scheduler": run.scheduler.state_dict(), "grad_scaler": scaler,
                "data_fingerprint": run.data_fingerprint}
        ckpt.finish_checkpoint(tmp, step, full, keep=run.config.eval.keep_checkpoints)
    acc.wait_for_everyone()


def resume_state(run: Run) -> tuple[int, dict[str, Any] | None]:
    """(step, trainer state) of the newest complete checkpoint when resuming, else (0, None)."""
    acc = run.accelerator
    checkpoints = ckpt.complete_checkpoints(run.output / "checkpoints")
    if not (run.config.resume and checkpoints):
        return 0, None
    restore = None
    if run.config.hardware.fsdp:  # every process holds the whole tensors; each keeps its shard
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_state_dict,
        )

        def restore(weights: dict[str, torch.Tensor], optimizer: dict[str, Any]) -> None:
            set_state_dict(run.wrapped, run.optimizer, model_state_dict=weights, optim_state_dict=optimizer,
                           options=StateDictOptions(full_state_dict=True, strict=False))
    state = ckpt.load_checkpoint(checkpoints[-1], run.objective, run.optimizer, acc.process_index, restore)
    saved = state.pop("data_fingerprint", None)
    if saved != run.data_fingerprint:
        raise LLMModulesError(
            f"{checkpoints[-1]} was trained on other data (fingerprint {str(saved)[:12]}, now "
            f"{run.data_fingerprint[:12]}): the data changed since it was saved, so resuming would continue a "
            "different batch order; restore the data or start a new --output"
        )
    run.scheduler.load_state_dict(state.pop("scheduler"))
    scaler = state.pop("grad_scaler", None)
    if scaler is not None and acc.scaler is not None:
        acc.scaler.load_state_dict(scaler)
    state.pop("optimizer")
    if acc.is_main_process:
        print(f"resumed from {checkpoints[-1]} at step {state['step']}")
    return state.pop("step"), state


def fit(run: Run, on_step: Callable[[Run, int], None] | None = None) -> dict[str, Any]:
    """Train to the step budget or early stop; keeps `best/` and `last/` and rank-0 metrics.

    Without validation data there is nothing to pick from: early stopping is off and `best/` is
    the last weights. `on_step(run, step)` runs after every optimizer step (evaluation hooks).
    """
    from tqdm.auto import tqdm

    acc, cfg = run.accelerator, run.config
    state = {"epoch": 0, "batch": 0, "best_val": None, "evals_since_best": 0, "elapsed": 0.0, "stopped_early": False}
    step, resumed = resume_state(run)
    state = resumed or state
    metrics_path = run.output / "metrics.jsonl"
    if acc.is_main_process:  # forget lines written after the checkpoint we resume from
        lines = metrics_path.read_text().splitlines() if step and metrics_path.is_file() else []
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    eval_every = cfg.eval.eval_every or run.steps_per_epoch
    patience = cfg.eval.early_stopping_patience if run.data.val else 0
    bar = tqdm(total=run.total_steps, initial=step, desc="train",
               disable=not (cfg.eval.progress and acc.is_main_process))
    started = time.perf_counter() - state["elapsed"]
    if step == 0:  # the starting point, so the curve shows what training changed
        initial = {"step": 0, **(validate(run) or {})}
        state["initial_val"] = initial
        if acc.is_main_process:
            with metrics_path.open("a") as f:
                f.write(json.dumps(initial) + "\n")
    run.wrapped.train()
    lengths = [len(e.input_ids) for e in run.data.train]
    while step < run.total_steps and not state["stopped_early"]:
        # One length-grouped batch per optimizer step, cut into grad_accum micro-batches of one global
        # batch each, so accumulation and process count never change what a step sees.
        step_size = run.global_batch * cfg.train.grad_accum
        order = length_grouped_batches(lengths, step_size, cfg.train.seed, state["epoch"])
        order = [b for b in order if len(b) == step_size]  # an incomplete batch would desync processes
        if state["batch"] >= len(order):
            state["epoch"], state["batch"] = state["epoch"] + 1, 0
            continue
        chosen = order[state["batch"]]
        run.objective.begin_step(step)
        loss = train_step(run, [chosen[i : i + run.global_batch] for i in range(0, step_size, run.global_batch)])
        step += 1
        state["batch"] += 1
        record = {"step": step, "epoch": state["epoch"], "loss": round(loss, 5),
                  "lr": run.scheduler.get_last_lr()[0], "time": round(time.perf_counter() - started, 2)}
        if (step % eval_every == 0 or step == run.total_steps) and run.data.val:
            val = validate(run)
            record.update(val)
            if state["best_val"] is None or val["val_loss"] < state["best_val"]:
                state["best_val"], state["best_val_bpb"] = val["val_loss"], val.get("val_bpb")
                state["best_val_metrics"], state["evals_since_best"] = val, 0  # val: with the drafter's agreement
                save_model(run, run.output / "best")
            else:
                state["evals_since_best"] += 1
                if patience and state["evals_since_best"] >= patience:
                    state["stopped_early"] = True
        if acc.is_main_process:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
        state["elapsed"] = time.perf_counter() - started
        if on_step is not None:
            on_step(run, step)
        if cfg.eval.save_every and step % cfg.eval.save_every == 0:
            save_checkpoint(run, step, state)
    bar.close()
    save_model(run, run.output / "last")
    if not run.data.val:
        save_model(run, run.output / "best")
    if not (cfg.eval.save_every and step % cfg.eval.save_every == 0):
        save_checkpoint(run, step, state)
    initial = state.get("initial_val") or {}
    return {"steps": step, "initial_val_loss": initial.get("val_loss"), "initial_val_bpb": initial.get("val_bpb"),
            "best_val_loss": state["best_val"], "best_val_bpb": state.get("best_val_bpb"),
            "best_val_metrics": state.get("best_val_metrics"),
            "stopped_early": state["stopped_early"], "train_seconds": round(state["elapsed"], 1)}


def train(config: TrainConfig, on_step: Callable[[Run, int], None] | None = None) -> dict[str, Any] | None:
    """Run (or resume) a whole training job; the main process returns a summary (also in summary.json)."""
    run = setup(config)
    try:
        return _fit_and_report(run, config, on_step)
    finally:
        if run.lock is not None:  # after an error too: the folder is free for the next run
            run.lock.release()


def _fit_and_report(run: Run, config: TrainConfig, on_step: Callable[[Run, int], None] | None
                    ) -> dict[str, Any] | None:
    summary = fit(run, on_step)
    acc = run.accelerator
    if acc.is_main_process:
        summary["method"] = config.method
        summary["data"] = run.data.report
        summary["parameters"] = run.objective.parameter_counts()
        summary["large_released"] = getattr(run.objective, "released", False)
        summary["state_cache_seconds"] = getattr(run.objective, "cache_seconds", 0.0)
        summary["state_cache_keys"] = getattr(run.objective, "cache_keys", [])
        summary.update(run.objective.summary_extras())
        if plot_losses(run.output / "metrics.jsonl", run.output / "loss_curve.png"):
            summary["loss_curve"] = str(run.output / "loss_curve.png")
        if config.eval.num_samples and run.data.val:
            best = run.output / "best" / WEIGHTS_FILE
            summary["samples_from"] = "best" if best.is_file() else "last"
            if config.hardware.fsdp:  # this process holds a shard of the weights: answer from the saved folder
                from llm_modules.evaluation.harness import load_scorer

                scorer = load_scorer(str(run.output / summary["samples_from"]), device=str(acc.device))
            else:
                if best.is_file():  # samples show the weights a user would keep, not merely the last ones
                    run.objective.load_trained_state_dict(load_file(str(best)))
                scorer = run.objective.scorer()
            summary["samples"] = held_out_samples(scorer, run.data.val[: config.eval.num_samples],
                                                  config.eval.max_new_tokens)
        (run.output / "summary.json").write_text(json.dumps(summary, indent=1))
    acc.wait_for_everyone()
    acc.end_training()
    return summary if acc.is_main_process else None
