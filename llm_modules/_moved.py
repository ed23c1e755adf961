"""Old import paths (before the sub-packages) keep working for one release, with a DeprecationWarning.

`import llm_modules.model` gives the very module `llm_modules.models.composed` (not a copy), so
classes and module state stay one. Removed in the next release.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

MOVED = {
    "config": "models.config", "model": "models.composed", "heads": "models.heads", "large": "models.large",
    "large_identity": "models.large_identity", "vocab_map": "models.vocab_map", "specs": "models.specs",
    "run_folder": "models.saved", "data_sources": "data.sources", "prompting": "data.prompting",
    "answers": "data.answers", "state_cache": "states.store", "cache_fence": "states.fence",
    "cache_admin": "states.admin", "train_config": "training.config", "train": "training.loop",
    "checkpoint": "training.checkpoint", "objectives": "training.objectives", "training_report": "training.report",
    "engine": "decoding.engine", "row_caches": "decoding.steppers", "generation": "decoding.generation",
    "evaluate": "evaluation.harness", "lm_eval_adapter": "evaluation.lm_eval",
    "serving": "entrypoints.openai", "serving.app": "entrypoints.openai.app",
    "serving.protocol": "entrypoints.openai.protocol", "serving.text": "entrypoints.openai.text",
}
PACKAGE = "llm_modules"


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        module = importlib.import_module(self.new)
        self.spec = module.__spec__  # the import system overwrites it with the alias's next
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self.spec


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(PACKAGE + "."):
            return None
        new = MOVED.get(fullname[len(PACKAGE) + 1:])
        if new is None:
            return None
        new = f"{PACKAGE}.{new}"
        warnings.warn(f"{fullname} moved to {new}; the old path goes in the next release", DeprecationWarning,
                      stacklevel=2)
        return importlib.machinery.ModuleSpec(fullname, _Alias(new))


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())  # before the path finder, which would load a moved file a second time
