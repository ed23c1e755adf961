"""Resumable training checkpoints as safetensors + JSON, written atomically.

A checkpoint folder `step-000120/` holds the trained weights (`model.safetensors` +
`llm_modules_config.json`, loadable by `LLMModulesModel.from_pretrained`), the optimizer's
tensors (`optimizer.safetensors`), each process's random states (`rng-<rank>.*`), and
`trainer_state.json` (step, data position, scheduler, optimizer hyper-parameters, best
validation loss...), written last: it marks the folder complete. It is written into a temporary
folder and renamed into place; a checkpoint of the same step is first renamed aside and deleted
only after the swap, and every delete removes the state file first. So a kill at any moment leaves
either the old set of complete checkpoints or the new one; never a checkpoint that loads half.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llm_modules.errors import LLMModulesError
from llm_modules.training.run_lock import check_no_other_run

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
PREFIX = "step-"
OLD = ".old-"  # a checkpoint renamed aside while a new one of the same step takes its place


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All random states that training consumes: tensors for safetensors, the rest for JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    np_state = np.random.get_state()
    tensors["numpy.keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    py_state = random.getstate()
    meta = {"python": [py_state[0], list(py_state[1]), py_state[2]], "numpy": [np_state[0], *np_state[2:]]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = sorted(k for k in tensors if k.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy.keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


def optimizer_to_safetensors(optimizer: torch.optim.Optimizer | dict[str, Any]
                             ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state dict (or the dict itself) into tensors ("state.<n>.<name>", n the
    parameter's position) and a JSON-able rest whose "keys" name the parameters: indices from
    `optimizer.state_dict()`, names from a full state dict gathered from FSDP shards."""
    state = optimizer.state_dict() if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    tensors, scalars, keys = {}, {}, list(state["state"])
    for position, key in enumerate(keys):
        for name, value in state["state"][key].items():
            if torch.is_tensor(value):
                tensors[f"state.{position}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{position}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars, "keys": keys}


def optimizer_from_safetensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    keys = meta.get("keys")  # absent in checkpoints written before FSDP: the positions were the indices
    state: dict[Any, dict[str, Any]] = {}
    for key, value in [*((k.split(".", 2)[1:], v) for k, v in tensors.items()),
                       *((k.split(".", 1), v) for k, v in meta["scalars"].items())]:
        position, name = key
        state.setdefault(keys[int(position)] if keys is not None else int(position), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def complete_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints under `directory` whose rename finished, oldest first. Read-only: safe to call
    while a run is writing into `directory` (a watcher, a test, an evaluation script)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def recover_checkpoints(directory: Path) -> list[Path]:
    """Finish the swaps that a kill interrupted, then list the complete checkpoints.

    Only when no run writes into `directory` (before a resume): a complete folder that is not yet
    in place goes into place (the new one of a swap first, else the old one goes back). A writer's
    own temporary folder is complete for a moment before its rename, so a listing that repaired
    would steal it from under a live run: a run that holds the output folder's lock (`run_lock`,
    `directory`'s parent) other than this process refuses it.
    """
    if not directory.is_dir():
        return []
    check_no_other_run(directory.parent)
    for aside in sorted(directory.glob(f"{OLD}{PREFIX}*")) + sorted(directory.glob(f".tmp-{PREFIX}*")):
        final = directory / (PREFIX + aside.name.partition(PREFIX)[2])
        if aside.is_dir() and (aside / STATE_FILE).is_file() and not final.exists():
            newer = directory / f".tmp-{final.name}"
            source = newer if (newer / STATE_FILE).is_file() else aside
            try:
                os.replace(source, final)
            except OSError:  # another process of the same resume did it first
                pass
    return complete_checkpoints(directory)


def temporary_folder(directory: Path, step: int) -> Path:
    """Where checkpoint `step` is written before its rename; the same name on every process."""
    return directory / f".tmp-{PREFIX}{step:06d}"


def write_weights_and_optimizer(tmp: Path, model: Any, optimizer: torch.optim.Optimizer | dict[str, Any],
                                weights: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Main process: trained weights and optimizer tensors; returns the optimizer's JSON part.
    `weights` and a state-dict `optimizer`: full tensors gathered from FSDP shards."""
    remove_checkpoint(tmp)
    model.save_pretrained(tmp, weights)
    opt_tensors, opt_meta = optimizer_to_safetensors(optimizer)
    save_file(opt_tensors, str(tmp / OPTIMIZER_FILE))
    return opt_meta


def write_rng(tmp: Path, rank: int) -> None:
    """Every process: its own random states (dropout masks differ per process)."""
    tensors, meta = rng_state()
    save_file(tensors, str(tmp / f"rng-{rank}.safetensors"))
    (tmp / f"rng-{rank}.json").write_text(json.dumps(meta))


def finish_checkpoint(tmp: Path, step: int, trainer_state: dict[str, Any], keep: int = 2) -> Path:
    """Main process, after every process wrote its part: fsync, state file last, atomic swap, pruning."""
    _fsync_tree(tmp)
    state_tmp = tmp / (STATE_FILE + ".tmp")
    with open(state_tmp, "w") as f:
        f.write(json.dumps({**trainer_state, "step": step}, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(state_tmp, tmp / STATE_FILE)  # from here on the folder is complete
    final = tmp.parent / f"{PREFIX}{step:06d}"
    aside = tmp.parent / f"{OLD}{final.name}"
    if final.exists():  # the same step saved again: swap, never delete the only copy first
        remove_checkpoint(aside)
        os.replace(final, aside)
    os.replace(tmp, final)
    remove_checkpoint(aside)
    for old in complete_checkpoints(tmp.parent)[:-keep] if keep > 0 else []:
        remove_checkpoint(old)
    for stale in [*tmp.parent.glob(f".tmp-{PREFIX}*"), *tmp.parent.glob(f"{OLD}{PREFIX}*")]:
        remove_checkpoint(stale)
    return final


def remove_checkpoint(folder: Path) -> None:
    """Delete a checkpoint folder, its completeness mark first: a kill mid-delete leaves no
    folder that looks complete."""
    (folder / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def load_checkpoint(path: Path, model: Any, optimizer: torch.optim.Optimizer, rank: int = 0,
                    restore: Any = None) -> dict[str, Any]:
    """Restore weights, optimizer and this process's RNG from `path`; returns the trainer state.
    `restore(weights, optimizer_state)` replaces the loading of the first two (FSDP scatters them)."""
    from llm_modules.models.saved import WEIGHTS_FILE

    try:
        state = json.loads((path / STATE_FILE).read_text())
        weights = load_file(str(path / WEIGHTS_FILE))
        optimizer_state = optimizer_from_safetensors(load_file(str(path / OPTIMIZER_FILE)), state["optimizer"])
        if restore is not None:
            restore(weights, optimizer_state)
        else:
            model.load_trained_state_dict(weights)
            optimizer.load_state_dict(optimizer_state)
        rng_file = path / f"rng-{rank}.safetensors"
        if not rng_file.is_file():
            raise LLMModulesError(
                f"checkpoint {path} was written by fewer processes (no random state for process {rank}); "
                "resume with the same number of processes"
            )
        set_rng_state(load_file(str(rng_file)), json.loads((path / f"rng-{rank}.json").read_text()))
    except (OSError, KeyError, ValueError) as err:
        raise LLMModulesError(f"checkpoint {path} cannot be loaded: {err}") from None
    return state


def _fsync_tree(folder: Path) -> None:
    for file in folder.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
