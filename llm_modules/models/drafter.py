"""What makes a saved composed model a speculative drafter, written beside it as JSON.

A drafter folder is a composed model folder (`LLMModulesModel.from_pretrained` loads it: the large model
named in its config is the TARGET it drafts for) plus `DRAFTER_FILE`, this record: how many tokens it was
trained to draft per verify step and what it was trained to match. A decoder reads both.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from llm_modules.errors import LLMModulesError
from llm_modules.models.saved import DRAFTER_FILE, resolve_model_folder

DRAFTER_FORMAT = 1
DRAFTER_LOSSES = ("kl", "ce")
DRAFTER_TARGETS = ("logits", "generated")


@dataclass
class DrafterRecord:
    """A drafter's training: `draft_tokens` (K) per block, where every position of a block read the large
    states up to the token just before the block (K = the draft length it was trained for; a decoder may
    draft fewer); `loss` "kl" (to the large model's next-token distribution) or "ce" (on its arg-max);
    `targets` "logits" (the large model's own on the training text) or "generated" (on its greedy answers).
    The target is the composed config's `large` (and `large_identity`, its weights' digests)."""

    draft_tokens: int
    loss: str = "kl"
    targets: str = "logits"
    format_version: int = DRAFTER_FORMAT

    def __post_init__(self) -> None:
        if not isinstance(self.draft_tokens, int) or isinstance(self.draft_tokens, bool) or self.draft_tokens < 1:
            raise LLMModulesError(f"draft_tokens must be an integer >= 1, got {self.draft_tokens!r}")
        if self.loss not in DRAFTER_LOSSES:
            raise LLMModulesError(f"drafter loss must be one of {', '.join(DRAFTER_LOSSES)}, got {self.loss!r}")
        if self.targets not in DRAFTER_TARGETS:
            raise LLMModulesError(f"drafter targets must be one of {', '.join(DRAFTER_TARGETS)}, got {self.targets!r}")
        if self.format_version != DRAFTER_FORMAT:
            raise LLMModulesError(f"drafter record format {self.format_version!r} is not this version's "
                                  f"({DRAFTER_FORMAT}); was it written by a newer llm-modules?")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / DRAFTER_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "DrafterRecord | None":
        """The record of a saved model folder (or a training run folder: its best/, else last/); None when
        the model is not a drafter."""
        path = resolve_model_folder(directory) / DRAFTER_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (ValueError, TypeError) as err:
            raise LLMModulesError(f"{path} is not a valid drafter record: {err}") from None
