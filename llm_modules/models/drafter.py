"""What makes a saved composed model a speculative drafter, written beside it as JSON.

A drafter folder is a composed model folder (`LLMModulesModel.from_pretrained` loads it: the large model
named in its config is the TARGET it drafts for) plus `DRAFTER_FILE`, this record: how many tokens it was
trained to draft per verify step and what it was trained to match. A decoder reads both. A drafter trained
on a smaller draft vocabulary (`vocab` > 0) also holds `DRAFT_VOCAB_FILE`: the target's token ids it drafts
from, sorted (safetensors, key "ids").
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from llm_modules.errors import LLMModulesError
from llm_modules.models.saved import DRAFTER_FILE, resolve_model_folder

DRAFTER_FORMAT = 1
DRAFTER_LOSSES = ("kl", "ce")
DRAFTER_TARGETS = ("logits", "generated")
DRAFT_VOCAB_FILE = "llm_modules_draft_vocab.safetensors"
# K per verify pass at most: a pass reads K + 1 positions and its cost grows with K, while a drafter's
# acceptance falls along the draft (speculative decoders draft a handful; EAGLE's trees reach depth ~10)
MAX_DRAFT_TOKENS = 64


@dataclass
class DrafterRecord:
    """A drafter's training: `draft_tokens` (K) per block, where every position of a block read the large
    states up to the token just before the block (K = the draft length it was trained for; a decoder may
    draft fewer); `loss` "kl" (to the large model's next-token distribution) or "ce" (on its arg-max);
    `targets` "logits" (the large model's own on the training text) or "generated" (on its greedy answers).
    `vocab`: the size of its draft vocabulary (0: the target's whole vocabulary).
    The target is the composed config's `large` (and `large_identity`, its weights' digests)."""

    draft_tokens: int
    loss: str = "kl"
    targets: str = "logits"
    vocab: int = 0
    format_version: int = DRAFTER_FORMAT

    def __post_init__(self) -> None:
        if (not isinstance(self.draft_tokens, int) or isinstance(self.draft_tokens, bool)
                or not 1 <= self.draft_tokens <= MAX_DRAFT_TOKENS):
            raise LLMModulesError(f"draft_tokens must be an integer between 1 and {MAX_DRAFT_TOKENS}, got "
                                  f"{self.draft_tokens!r}")
        if self.loss not in DRAFTER_LOSSES:
            raise LLMModulesError(f"drafter loss must be one of {', '.join(DRAFTER_LOSSES)}, got {self.loss!r}")
        if self.targets not in DRAFTER_TARGETS:
            raise LLMModulesError(f"drafter targets must be one of {', '.join(DRAFTER_TARGETS)}, got {self.targets!r}")
        if not isinstance(self.vocab, int) or isinstance(self.vocab, bool) or self.vocab < 0:
            raise LLMModulesError(f"drafter vocab must be an integer >= 0, got {self.vocab!r}")
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


def save_draft_vocab(directory: str | Path, ids: torch.Tensor) -> Path:
    from safetensors.torch import save_file

    path = Path(directory) / DRAFT_VOCAB_FILE
    save_file({"ids": ids.detach().to("cpu", torch.long).contiguous()}, str(path))
    return path


def check_draft_tokens(k: int, name: str = "--draft-tokens") -> None:
    """K drafted per verify pass: at least 1, at most MAX_DRAFT_TOKENS (`name`: what the caller calls it)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_DRAFT_TOKENS:
        raise LLMModulesError(f"{name} must be between 1 and {MAX_DRAFT_TOKENS}, got {k!r}")


def load_draft_vocab(directory: str | Path, record: DrafterRecord, vocab_size: int | None = None
                     ) -> torch.Tensor | None:
    """The draft vocabulary of the drafter saved in `directory` (None: it drafts from the whole vocabulary):
    `record.vocab` distinct token ids in increasing order, each in [0, vocab_size) (the target's vocabulary)."""
    if not record.vocab:
        return None
    path = resolve_model_folder(directory) / DRAFT_VOCAB_FILE
    if not path.is_file():
        raise LLMModulesError(f"{path} is missing: the drafter record says it drafts from {record.vocab} tokens")
    from safetensors.torch import load_file

    try:
        ids = load_file(str(path)).get("ids")
    except Exception as err:  # safetensors' own errors: a truncated or foreign file
        raise LLMModulesError(f"{path} is not a readable safetensors file ({err})") from None
    if (ids is None or ids.dim() != 1 or ids.numel() != record.vocab or ids.is_floating_point()
            or ids.is_complex() or ids.dtype == torch.bool or bool((ids[1:] <= ids[:-1]).any())):
        raise LLMModulesError(f"{path} does not hold the {record.vocab} sorted, distinct integer token ids its "
                              "drafter record names")
    if bool((ids < 0).any()):
        raise LLMModulesError(f"{path} holds negative token ids (smallest {int(ids.min())}); a draft vocabulary "
                              "lists ids of the target's vocabulary")
    if vocab_size is not None and int(ids.max()) >= vocab_size:
        raise LLMModulesError(f"{path} holds token ids past the target's vocabulary (largest {int(ids.max())}, "
                              f"the vocabulary has {vocab_size}); was it saved for another model?")
    return ids.long()
