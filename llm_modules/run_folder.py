"""A training output folder is a model: `runs/x` stands for its `best/` weights, else its `last/`.

`train --output runs/x` writes the saved composed models `runs/x/best` (best validation loss) and
`runs/x/last` beside its checkpoints. Wherever a saved model folder is taken, the run folder is
taken too, and one line says which of the two was used.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .config import CONFIG_FILE, WEIGHTS_FILE
from .errors import LLMModulesError

logger = logging.getLogger(__name__)

RUN_MODELS = ("best", "last")  # in order of preference


def is_saved_model(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def is_run_folder(folder: Path) -> bool:
    return any((folder / name / CONFIG_FILE).is_file() for name in RUN_MODELS)


def resolve_model_folder(directory: str | Path) -> Path:
    """The saved composed model that `directory` names: itself, or a run's best/ (else last/)."""
    folder = Path(directory)
    if (folder / CONFIG_FILE).is_file():
        return folder
    for name in RUN_MODELS:
        if is_saved_model(folder / name):
            logger.warning("using %s (%s weights of the training run in %s)", folder / name,
                           "the best validation" if name == "best" else "the last", folder)
            return folder / name
    where = "" if folder.is_dir() else " (no such folder)"
    raise LLMModulesError(
        f"{folder}{where} is not a saved llm-modules model ({CONFIG_FILE} is missing): expected {CONFIG_FILE} "
        f"and {WEIGHTS_FILE} in it, or a training run folder (train --output) holding best/ or last/ with them"
    )
