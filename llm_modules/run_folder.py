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
from .objectives import PLAIN_FILE

logger = logging.getLogger(__name__)

RUN_MODELS = ("best", "last")  # in order of preference
DESCRIPTIONS = (CONFIG_FILE, PLAIN_FILE)  # a composed model's, a plain method's (objectives.py)


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
