"""The rules of a saved folder: its file names, what kind of model it holds, and which folder a
training run stands for.

A saved model is a JSON description (`CONFIG_FILE` for a composed model, `PLAIN_FILE` for a plain
one) beside `WEIGHTS_FILE`, safetensors of the trained tensors only. A training output folder is a
model too: `train --output runs/x` writes the saved models `runs/x/best` (best validation loss) and
`runs/x/last` beside its checkpoints and `RUN_CONFIG_FILE`; wherever a saved model folder is taken,
the run folder is taken too, and one line says which of the two was used.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from llm_modules.errors import LLMModulesError

logger = logging.getLogger(__name__)

CONFIG_FILE = "llm_modules_config.json"  # a composed model's description (models.compose_config.ComposeConfig)
PLAIN_FILE = "llm_modules_plain.json"  # a plain (finetune / lora / distill) model's (models.plain.PlainSpec)
WEIGHTS_FILE = "model.safetensors"  # the trained tensors, beside either description
RUN_CONFIG_FILE = "run_config.json"  # a training run's options (training.config.TrainConfig)
DRAFTER_FILE = "llm_modules_drafter.json"  # beside CONFIG_FILE: the composed model is a drafter (models.drafter)
RUN_MODELS = ("best", "last")  # in order of preference
DESCRIPTIONS = (CONFIG_FILE, PLAIN_FILE)
# the segments that FSDP's auto-wrap, activation checkpointing and torch.compile add to parameter names
# (named_parameters) but not to state-dict keys
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def saved_kind(directory: str | Path) -> str | None:
    """'composed' or 'plain' for a folder written by save_pretrained; None otherwise."""
    directory = Path(directory)
    if (directory / CONFIG_FILE).is_file():
        return "composed"
    if (directory / PLAIN_FILE).is_file():
        return "plain"
    return None


def plain_name(name: str) -> str:
    """A parameter's name as the state dict gives it, without the segments of a wrapper around its module."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def cpu_copies(trained: dict[str, torch.Tensor], state: dict[str, torch.Tensor] | None = None
               ) -> dict[str, torch.Tensor]:
    """CPU copies of the `trained` tensors to save, taken from `state` (the same names, gathered from
    FSDP shards) when given; `state`'s other names are left out."""
    if state is not None:
        missing = sorted(set(trained) - set(state))
        if missing:
            raise LLMModulesError(f"the weights to save lack trained tensors {missing[:5]}")
        trained = {k: state[k] for k in trained}
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in trained.items()}


def save_weights(directory: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write WEIGHTS_FILE atomically (a temporary file, then a rename)."""
    from safetensors.torch import save_file

    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(directory / WEIGHTS_FILE)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a WEIGHTS_FILE; a file that is not readable safetensors (truncated, overwritten)
    is an LLMModulesError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise LLMModulesError(f"{path} is not a readable safetensors file ({err}); save or train the model again") \
            from None


def _described(folder: Path) -> bool:
    return any((folder / name).is_file() for name in DESCRIPTIONS)


def is_saved_model(folder: Path) -> bool:
    return _described(folder) and (folder / WEIGHTS_FILE).is_file()


def is_run_folder(folder: Path) -> bool:
    return any(_described(folder / name) for name in RUN_MODELS)


def resolve_model_folder(directory: str | Path) -> Path:
    """The saved model that `directory` names: itself, or a run's best/ (else last/)."""
    folder = Path(directory)
    if _described(folder):
        return folder
    for name in RUN_MODELS:
        if is_saved_model(folder / name):
            logger.warning("using %s (%s weights of the training run in %s)", folder / name,
                           "the best validation" if name == "best" else "the last", folder)
            return folder / name
    where = "" if folder.is_dir() else " (no such folder)"
    raise LLMModulesError(
        f"{folder}{where} is not a saved llm-modules model ({CONFIG_FILE} is missing): expected {CONFIG_FILE} "
        f"(or {PLAIN_FILE}) and {WEIGHTS_FILE} in it, or a training run folder (train --output) holding best/ "
        "or last/ with them"
    )


def run_defaults(model_dir: str | Path) -> dict[str, Any]:
    """Data options of the training run that produced `model_dir` (its own or its parent's RUN_CONFIG_FILE)."""
    for folder in (Path(model_dir), Path(model_dir).parent):
        path = folder / RUN_CONFIG_FILE
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise LLMModulesError(f"{path} cannot be read ({err}); restore it or give the options "
                                      "(--data, --template) yourself with a saved model folder") from None
            if not isinstance(saved, dict):
                raise LLMModulesError(f"{path} must hold a JSON object of the run's options")
            if isinstance(saved.get("data"), dict):  # grouped (training.config.FORMAT_VERSION 2): DataConfig's fields
                data = dict(saved["data"])
                data["data"] = data.pop("spec", None)
                return {k: v for k, v in data.items() if v is not None}
            keys = ("data", "template", "loss_on", "max_length", "overflow", "val_fraction", "subset")
            found = {k: saved[k] for k in keys if k in saved}
            if "data_seed" in saved or "seed" in saved:  # runs before data_seed split with their seed
                found["seed"] = saved.get("data_seed", saved.get("seed"))
            return found
    return {}
