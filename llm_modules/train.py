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
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file

from . import checkpoint as ckpt
from .config import WEIGHTS_FILE
from .data import (
    DataConfig, PreparedData, TokenizedExample, collate, length_grouped_batches, pad_id, prepare_data,
)
from .errors import LLMModulesError
from .model import LLMModulesModel
from .train_config import RUN_CONFIG_FILE, TrainConfig
from .training_report import held_out_samples, plot_losses

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """What `setup` builds and `fit` uses."""

    config: TrainConfig
    accelerator: Accelerator
    model: LLMModulesModel  # unwrapped
    wrapped: Any  # what accelerate.prepare returned (DDP on several processes)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    data: PreparedData
    train_states: Any  # StateCache or None
    val_states: Any
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    output: Path
    parameters: dict[str, dict[str, int]]  # counted before any release of the large model
    large_released: bool  # its weights freed while training (see LLMModulesModel.release_large)


def mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def check_output(output: Path, config: TrainConfig) -> None:
    """Refuse to write over a different run, or over this run's checkpoints without --resume."""
    saved = output / RUN_CONFIG_FILE
    if not saved.is_file():
        if output.is_dir() and any(output.iterdir()) and not config.resume:
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
    if not config.resume:
        raise LLMModulesError(f"output folder {output} already holds this run; add --resume to continue it")


def build_state_caches(config: TrainConfig, model: LLMModulesModel, data: PreparedData, accelerator: Accelerator):
    """Large-model states of train and validation examples, computed once (main process first)."""
    if not config.state_cache:
        return None, None
    from .cache_admin import enforce_size_cap
    from .specs import cache_dir
    from .state_cache import StateCache, examples_digest, model_state_key, state_cache_key

    root = Path(config.state_cache_dir) if config.state_cache_dir else cache_dir() / "states"
    model_key = model_state_key(model, config.state_cache_dtype)
    caches = []
    with accelerator.main_process_first():
        for examples in (data.train, data.val):  # keyed by token ids: another split reuses their states
            key = state_cache_key(model, examples_digest(examples), config.state_cache_dtype)
            caches.append(StateCache.open_or_build(
                root, key, model, examples, dtype=config.state_cache_dtype,
                progress=config.progress and accelerator.is_main_process, model_key=model_key,
            ) if examples else None)
    if accelerator.is_main_process:
        size = sum(c.size_bytes for c in caches if c is not None)
        reused = all(c is None or not c.built for c in caches)
        computed = sum(c.computed for c in caches if c is not None)
        print(f"large-model state cache: {size / 2**20:.1f} MiB ({'reused' if reused else 'built'}, {computed} of "
              f"{len(data.train) + len(data.val)} examples through the large model) in {root}")
        enforce_size_cap(root, keep={c.path.name for c in caches if c is not None})
    return caches[0], caches[1]


def _data_config(config: TrainConfig) -> DataConfig:
    return DataConfig(spec=config.data, template=config.template, loss_on=config.loss_on, max_length=config.max_length,
                      overflow=config.overflow, val_fraction=config.val_fraction, seed=config.seed, subset=config.subset)


def lr_lambda(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def setup(config: TrainConfig) -> Run:
    # cpu=True on machines without CUDA lets accelerate see torchrun/accelerate-launch processes (gloo).
    accelerator = Accelerator(mixed_precision=mixed_precision(config.mixed_precision), cpu=not torch.cuda.is_available())
    output = Path(config.output)
    if accelerator.is_main_process:
        check_output(output, config)
        output.mkdir(parents=True, exist_ok=True)
        (output / RUN_CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=1))
    accelerator.wait_for_everyone()
    set_seed(config.seed)
    model = LLMModulesModel.compose(large=config.large, small=config.small, **config.compose_options())
    if model.tokenizer is None:
        raise LLMModulesError(f"the large model {config.large!r} has no tokenizer; training needs one")
    if config.gradient_checkpointing:
        model.small.gradient_checkpointing_enable()
    model.to(accelerator.device)
    data = prepare_data(_data_config(config), model.tokenizer, model.small_max_positions)
    if accelerator.is_main_process:
        (output / "data_report.json").write_text(json.dumps(data.report, indent=1))
        print(f"data: {json.dumps(data.report)}")
    train_states, val_states = build_state_caches(config, model, data, accelerator)
    parameters = model.parameter_counts()
    released = train_states is not None and config.release_large and model.release_large()
    if released and accelerator.is_main_process:
        print("large model released for training from cached states (reloaded for the end-of-training samples)")

    global_batch = config.batch_size * accelerator.num_processes
    steps_per_epoch = len(data.train) // (global_batch * config.grad_accum)
    if steps_per_epoch == 0:
        raise LLMModulesError(
            f"{len(data.train)} training examples are fewer than one optimizer step's "
            f"{global_batch * config.grad_accum} (batch size x processes x grad accum); lower them or add data"
        )
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    groups = [
        {"params": [p for p in model.bridge.parameters() if p.requires_grad], "lr": config.lr_bridge},
        {"params": [p for m in (model.small, model.head) for p in m.parameters() if p.requires_grad],
         "lr": config.lr_small},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, int(config.warmup_ratio * total_steps))
    )
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    return Run(config, accelerator, model, wrapped, optimizer, scheduler, data, train_states, val_states,
               global_batch, steps_per_epoch, total_steps, output, parameters, released)


def batch_tensors(run: Run, examples: list[TokenizedExample], indices: list[int], states: Any) -> dict[str, Any]:
    batch = collate(examples, pad_id(run.model.tokenizer))
    if states is not None:
        batch["large_states"] = states.batch(indices, pad_to=batch["input_ids"].shape[1])
    return {k: v.to(run.accelerator.device) for k, v in batch.items()}


def loss_tokens(examples: list[TokenizedExample]) -> int:
    return sum(sum(1 for x in e.labels[1:] if x != -100) for e in examples)


@torch.no_grad()
def validate(run: Run) -> float:
    """Mean cross-entropy per answer token over the fixed validation split (all processes)."""
    if not run.data.val:
        return float("nan")
    run.wrapped.eval()
    acc, rank, world = run.accelerator, run.accelerator.process_index, run.accelerator.num_processes
    mine = list(range(rank, len(run.data.val), world))
    total = torch.zeros(2, dtype=torch.float64, device=acc.device)
    for start in range(0, len(mine), run.config.batch_size):
        indices = mine[start : start + run.config.batch_size]
        examples = [run.data.val[i] for i in indices]
        batch = batch_tensors(run, examples, indices, run.val_states)
        out = run.wrapped(**batch, return_logits=False, loss_reduction="sum")
        total += torch.tensor([out.loss.item(), loss_tokens(examples)], dtype=torch.float64, device=acc.device)
    total = acc.reduce(total, reduction="sum")
    run.wrapped.train()
    return float(total[0] / total[1])


def train_step(run: Run, batches: list[list[int]]) -> float:
    """One optimizer step over `grad_accum` global batches; returns the mean loss per answer token."""
    acc, cfg = run.accelerator, run.config
    rank = acc.process_index
    step_tokens = sum(loss_tokens([run.data.train[i] for i in b]) for b in batches)
    loss_sum = 0.0
    for n, global_indices in enumerate(batches):
        indices = global_indices[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
        examples = [run.data.train[i] for i in indices]
        batch = batch_tensors(run, examples, indices, run.train_states)
        last = n == len(batches) - 1
        with nullcontext() if last else acc.no_sync(run.wrapped):
            out = run.wrapped(**batch, return_logits=False, loss_reduction="sum")
            acc.backward(out.loss * (acc.num_processes / step_tokens))
        loss_sum += out.loss.item()
    if cfg.max_grad_norm > 0:
        acc.clip_grad_norm_(run.model.parameters(), cfg.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    total = acc.reduce(torch.tensor([loss_sum], dtype=torch.float64, device=acc.device), reduction="sum")
    return float(total[0]) / step_tokens


def save_checkpoint(run: Run, step: int, state: dict[str, Any]) -> None:
    acc = run.accelerator
    tmp = ckpt.temporary_folder(run.output / "checkpoints", step)
    opt_meta = None
    if acc.is_main_process:
        opt_meta = ckpt.write_weights_and_optimizer(tmp, run.model, run.optimizer)
    acc.wait_for_everyone()
    ckpt.write_rng(tmp, acc.process_index)
    acc.wait_for_everyone()
    if acc.is_main_process:
        full = {**state, "optimizer": opt_meta, "scheduler": run.scheduler.state_dict()}
        ckpt.finish_checkpoint(tmp, step, full, keep=run.config.keep_checkpoints)
    acc.wait_for_everyone()


def fit(run: Run) -> dict[str, Any]:
    """Train to the step budget or early stop; keeps `best/` and `last/` and rank-0 metrics."""
    from tqdm.auto import tqdm

    acc, cfg = run.accelerator, run.config
    state = {"epoch": 0, "batch": 0, "best_val": None, "evals_since_best": 0, "elapsed": 0.0, "stopped_early": False}
    step = 0
    checkpoints = ckpt.complete_checkpoints(run.output / "checkpoints")
    if cfg.resume and checkpoints:
        state = ckpt.load_checkpoint(checkpoints[-1], run.model, run.optimizer, acc.process_index)
        run.scheduler.load_state_dict(state.pop("scheduler"))
        state.pop("optimizer")
        step = state.pop("step")
        if acc.is_main_process:
            print(f"resumed from {checkpoints[-1]} at step {step}")
    metrics_path = run.output / "metrics.jsonl"
    if acc.is_main_process:  # forget lines written after the checkpoint we resume from
        lines = metrics_path.read_text().splitlines() if step and metrics_path.is_file() else []
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    eval_every = cfg.eval_every or run.steps_per_epoch
    bar = tqdm(total=run.total_steps, initial=step, desc="train", disable=not (cfg.progress and acc.is_main_process))
    started = time.perf_counter() - state["elapsed"]
    if step == 0:  # the starting point, so the curve shows what training changed
        initial = {"step": 0, "val_loss": round(validate(run), 5)}
        state["initial_val"] = initial["val_loss"]
        if acc.is_main_process:
            with metrics_path.open("a") as f:
                f.write(json.dumps(initial) + "\n")
    run.wrapped.train()
    lengths = [len(e.input_ids) for e in run.data.train]
    while step < run.total_steps and not state["stopped_early"]:
        # One length-grouped batch per optimizer step, cut into grad_accum micro-batches of one global
        # batch each, so accumulation and process count never change what a step sees.
        step_size = run.global_batch * cfg.grad_accum
        order = length_grouped_batches(lengths, step_size, cfg.seed, state["epoch"])
        order = [b for b in order if len(b) == step_size]  # an incomplete batch would desync processes
        if state["batch"] >= len(order):
            state["epoch"], state["batch"] = state["epoch"] + 1, 0
            continue
        chosen = order[state["batch"]]
        loss = train_step(run, [chosen[i : i + run.global_batch] for i in range(0, step_size, run.global_batch)])
        step += 1
        state["batch"] += 1
        record = {"step": step, "epoch": state["epoch"], "loss": round(loss, 5),
                  "lr_bridge": run.scheduler.get_last_lr()[0], "time": round(time.perf_counter() - started, 2)}
        if step % eval_every == 0 or step == run.total_steps:
            val = validate(run)
            record["val_loss"] = round(val, 5)
            if state["best_val"] is None or val < state["best_val"]:
                state["best_val"], state["evals_since_best"] = val, 0
                if acc.is_main_process:
                    run.model.save_pretrained(run.output / "best")
            else:
                state["evals_since_best"] += 1
                if cfg.early_stopping_patience and state["evals_since_best"] >= cfg.early_stopping_patience:
                    state["stopped_early"] = True
        if acc.is_main_process:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
        state["elapsed"] = time.perf_counter() - started
        if cfg.save_every and step % cfg.save_every == 0:
            save_checkpoint(run, step, state)
    bar.close()
    if acc.is_main_process:
        run.model.save_pretrained(run.output / "last")
    if not (cfg.save_every and step % cfg.save_every == 0):
        save_checkpoint(run, step, state)
    return {"steps": step, "initial_val_loss": state.get("initial_val"), "best_val_loss": state["best_val"],
            "stopped_early": state["stopped_early"],
            "train_seconds": round(state["elapsed"], 1)}


def train(config: TrainConfig) -> dict[str, Any] | None:
    """Run (or resume) a whole training job; the main process returns a summary (also in summary.json)."""
    run = setup(config)
    summary = fit(run)
    acc = run.accelerator
    if acc.is_main_process:
        summary["data"] = run.data.report
        summary["parameters"] = run.parameters
        summary["large_released"] = run.large_released
        if plot_losses(run.output / "metrics.jsonl", run.output / "loss_curve.png"):
            summary["loss_curve"] = str(run.output / "loss_curve.png")
        if config.num_samples and run.data.val:
            best = run.output / "best" / WEIGHTS_FILE
            summary["samples_from"] = "best" if best.is_file() else "last"
            if best.is_file():  # samples show the weights a user would keep, not merely the last ones
                run.model.load_trained_state_dict(load_file(str(best)))
            run.model.restore_large()
            summary["samples"] = held_out_samples(run.model, run.data.val[: config.num_samples], config.max_new_tokens)
        (run.output / "summary.json").write_text(json.dumps(summary, indent=1))
    acc.wait_for_everyone()
    acc.end_training()
    return summary if acc.is_main_process else None
