"""The composition config: which two models, how the bridge is shaped, which head; saved as JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import LLMModulesError

HEAD_KINDS = ("new", "projected", "residual")
CONFIG_FILE = "llm_modules_config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class ComposeConfig:
    """How a frozen large LM, the Enhanced Cross-Attention bridge and a small LM are put together.

    `large` and `small` are model specs (see `llm_modules.specs`). Bridge defaults are the paper's:
    2 Enhanced Cross-Attention layers, 8 heads, adapter width 256, dropout 0.1.
    `head` picks how the small model's output becomes logits over the LARGE vocabulary:
      - "residual" (the default): the large model's own logits plus the projected head's
        correction, the correction zero-initialised so training starts from the large model's
        predictions. It is the default because it is the only head that beat the large model
        zero-shot in our transfer reports (reports/*/results.md, 3 seeds each);
      - "new": a fresh Linear(d_small, |V_large|) (the paper's head);
      - "projected": a trainable Linear(d_small, d_large) followed by the large model's frozen
        output embedding.
    `causal=False` reproduces the paper's leak: every position reads the large model's states
    of later positions too. Only for reproducing the paper.
    """

    large: str
    small: str
    causal: bool = True
    head: str = "residual"
    num_layers: int = 2
    num_heads: int = 8
    adapter_dim: int = 256
    dropout: float = 0.1
    large_layer: int = -1  # which hidden state of the large model feeds the bridge (-1: last, after the final norm)
    library_version: str = ""
    # digests of the large weights this model was trained on (see large_identity); {} in older folders
    large_identity: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head not in HEAD_KINDS:
            raise LLMModulesError(f"unknown head kind {self.head!r}; valid kinds: {', '.join(HEAD_KINDS)}")
        for name in ("num_layers", "num_heads", "adapter_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "num_layers" else 1):
                raise LLMModulesError(f"bridge option {name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LLMModulesError(f"bridge option dropout must be in [0, 1), got {self.dropout!r}")
        if self.head == "residual" and self.large_layer != -1:
            raise LLMModulesError("head 'residual' adds to the large model's own logits, so it needs large_layer=-1 "
                                  "(use head 'new' or 'projected' to feed the bridge another layer)")
        if not self.library_version:
            from . import __version__

            self.library_version = __version__

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_FILE
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "ComposeConfig":
        path = Path(directory) / CONFIG_FILE
        if not path.is_file():
            raise LLMModulesError(f"{directory} is not a saved llm-modules model: {CONFIG_FILE} is missing")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise LLMModulesError(f"{path} is not valid JSON: {err}") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LLMModulesError(f"{path} has unknown keys {unknown}; was it written by a newer llm-modules?")
        return cls(**data)
