"""The composition config: which two models, which bridge and its options, which head, which small-model
inputs; saved as JSON. Versioned: folders saved before bridges had names (format 1) still load."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_modules.bridges import bridge_options, option_names
from llm_modules.errors import LLMModulesError
from llm_modules.models.saved import CONFIG_FILE

HEAD_KINDS = ("new", "projected", "residual", "own")
SMALL_INPUTS = ("bridge", "mapped", "own")  # "own": head "own" only, which sets it
LARGE_READS = ("all", "prompt")
# 1: no version field, the Enhanced Cross-Attention options at the top level;
# 2: ladder/xattn gates were tanh(alpha), i.e. gate_temperature 1 (3 writes it out, default 0.1)
CONFIG_FORMAT = 3
GATED_BRIDGES = ("ladder", "xattn")  # bridges whose gates have a temperature (format 3)
_FORMAT_1_BRIDGE_KEYS = ("num_layers", "num_heads", "adapter_dim", "dropout", "large_layer")


@dataclass
class ComposeConfig:
    """How a frozen large LM, a bridge and a small LM are put together.

    `large` and `small` are model specs (see `llm_modules.models.specs`). `bridge` names one of
    `llm_modules.bridges.BRIDGES` and `bridge_options` holds its options (every option written
    out, defaults included); the default, `eca`, is the paper's Enhanced Cross-Attention.
    `head` picks how the small model's output becomes logits over the LARGE vocabulary:
      - "residual" (the default): the large model's own logits plus the projected head's
        correction, the correction zero-initialised so training starts from the large model's
        predictions. It is the default because it is the only head that beat the large model
        zero-shot in our transfer reports (reports/*/results.md, 3 seeds each);
      - "new": a fresh Linear(d_small, |V_large|) (the paper's head);
      - "projected": a trainable Linear(d_small, d_large) followed by the large model's frozen
        output embedding;
      - "own": the small model's own language head over its OWN tokenizer and vocabulary (not the large
        one): the small model reads its own token ids through its own embeddings (small_inputs is then
        "own", set for you), labels are the answer re-tokenized by the small tokenizer, and the model's
        `tokenizer` is the small one (generation, the server and evaluation decode with it). The large
        model reads the prompt's text re-tokenized by its own tokenizer (`own_prompt.retokenize`), and every
        small position reads the large states of the whole prompt (as a decoder reads its encoder's output).
        It needs large_reads "prompt" and a bridge whose outputs pass through zero-initialised gates
        (ladder, xattn; eca's output is not gated): untrained, the model is exactly the small model alone.
    `small_inputs` picks what the small model reads as its input embeddings:
      - "bridge" (the paper): only the bridge's output;
      - "own": its own token embeddings of its own tokenizer's ids (head "own", which sets it);
      - "mapped": its own pretrained token embeddings through a vocabulary map (each large token's
        text re-tokenized by the small tokenizer, its embeddings averaged; see `vocab_map`), plus the
        bridge's output when the bridge gives one. `train_embeddings` makes those embeddings trainable.
    `train_small=False` freezes the small model's own weights (CALM's setting: both models frozen):
    only the bridge, the head and, with `train_embeddings`, the mapped embeddings train, and a saved
    folder holds only those (the small model comes back from its spec).
    `small_layers=N` keeps the small model's first N decoder layers (None: all): a drafter, or a small side
    that decodes alone, is cheaper the shallower it is (EAGLE's drafter is one layer).
    `large_reads` picks which of the large model's states a position reads:
      - "all" (the default): its own and every earlier one, so generation runs the large model on every
        new token too (a decode step costs the large model plus the small one);
      - "prompt": those of the prompt only (the positions before the answer): position t reads up to
        min(t, answer_start - 1). Generation runs the large model once over the prompt, then decodes with
        the bridge and the small model alone (Whisper's cross-attention over an encoder's output, LLM-to-SLM).
        Answer positions read the last prompt position's state where a bridge reads one (eca: its output
        there; ladder: its taps) and every prompt state where a bridge attends (xattn). It needs
        small_inputs "mapped" (with "bridge" every answer position would get the same input, blind to the
        tokens generated) and a head other than "residual" (which adds the large model's logits at the
        very position predicted); or the head "own" (its small side in its own tokens, every position reading
        the whole prompt's states). The head "own" takes no other mode: with "all" the large model would read
        the answer too, and the large tokenization of a growing text is not a prefix of the final one (a
        token can merge across the newest small token's end), so training and decoding would read different
        large states.
    `causal=False` reproduces the paper's leak: every position reads the large model's states
    of later positions too. Only for reproducing the paper.
    """

    large: str
    small: str
    causal: bool = True
    head: str = "residual"
    bridge: str = "eca"
    bridge_options: dict[str, Any] = field(default_factory=dict)
    small_inputs: str = "bridge"
    train_embeddings: bool = False
    train_small: bool = True
    small_layers: int | None = None
    large_reads: str = "all"  # absent from folders saved before it existed: they read "all"
    library_version: str = ""
    # digests of the large weights this model was trained on (see large_identity); {} in older folders
    large_identity: dict = field(default_factory=dict)
    format_version: int = CONFIG_FORMAT

    def __post_init__(self) -> None:
        if self.head not in HEAD_KINDS:
            raise LLMModulesError(f"unknown head kind {self.head!r}; valid kinds: {', '.join(HEAD_KINDS)}")
        if self.head == "own":
            self._check_own_head()
        elif self.small_inputs == "own":
            raise LLMModulesError("small_inputs='own' (the small model's own tokens) goes with head 'own' only")
        if self.small_inputs not in SMALL_INPUTS:
            raise LLMModulesError(f"unknown small_inputs {self.small_inputs!r}; valid: {', '.join(SMALL_INPUTS)}")
        if self.large_reads not in LARGE_READS:
            raise LLMModulesError(f"unknown large_reads {self.large_reads!r}; valid: {', '.join(LARGE_READS)}")
        if self.large_reads == "prompt" and self.head == "residual":
            raise LLMModulesError("large_reads='prompt' cannot use the residual head: it adds the large model's logits "
                                  "at every answer position, where the large model never runs; use head 'projected' "
                                  "or 'new'")
        if self.large_reads == "prompt" and self.small_inputs not in ("mapped", "own"):
            raise LLMModulesError("large_reads='prompt' needs small_inputs='mapped': with 'bridge' the small model's "
                                  "only input at every answer position would be the same prompt state, blind to the "
                                  "tokens it generates")
        if self.large_reads == "prompt" and not self.causal:
            raise LLMModulesError("large_reads='prompt' reads the prompt causally; it cannot be combined with causal=False")
        if self.train_embeddings and self.small_inputs != "mapped":
            raise LLMModulesError("train_embeddings needs small_inputs='mapped' (with 'bridge' the small model "
                                  "has no token embeddings)")
        if self.small_layers is not None and (not isinstance(self.small_layers, int) or isinstance(
                self.small_layers, bool) or self.small_layers < 1):
            raise LLMModulesError(f"small_layers must be an integer >= 1 (or null for all), got {self.small_layers!r}")
        for name in ("train_embeddings", "train_small"):
            if not isinstance(getattr(self, name), bool):
                raise LLMModulesError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.bridge_options, dict):
            raise LLMModulesError(f"bridge_options must be a mapping, got {self.bridge_options!r}")
        self.bridge_options = dataclasses.asdict(self.options())  # validated, defaults written out
        if self.format_version != CONFIG_FORMAT:
            raise LLMModulesError(f"composition config format {self.format_version!r} is not this version's "
                                  f"({CONFIG_FORMAT}); was it written by a newer llm-modules?")
        if not self.library_version:
            from llm_modules.version import __version__

            self.library_version = __version__

    def _check_own_head(self) -> None:
        """Head "own": the small side in its own tokens, reading the prompt only, through zero-started gates."""
        if self.small_inputs not in ("bridge", "own"):  # "bridge", the default: not chosen
            raise LLMModulesError(f"head 'own' reads the small model's own tokens through its own embeddings; "
                                  f"leave out small_inputs (got {self.small_inputs!r})")
        self.small_inputs = "own"
        if self.large_reads != "prompt":
            raise LLMModulesError("head 'own' needs --large-reads prompt: the two tokenizers cut the text apart, and "
                                  "only the prompt's states are aligned for every small position (large_reads='prompt')")
        if self.bridge not in GATED_BRIDGES:
            raise LLMModulesError(f"head 'own' needs a bridge whose output starts at zero (ladder or xattn: gated); "
                                  f"the {self.bridge!r} bridge's is not gated, so the model would not start as the "
                                  f"small model alone")
        if self.train_embeddings:
            raise LLMModulesError("head 'own': the small model's own embeddings train with it (train_small); "
                                  "train_embeddings is for small_inputs='mapped'")

    def options(self) -> Any:
        """The bridge's options as its own dataclass."""
        return bridge_options(self.bridge, self.bridge_options)

    @classmethod
    def from_options(cls, large: str, small: str, **options: Any) -> "ComposeConfig":
        """Flat keyword options (as `compose` takes them): config fields by name, the rest the bridge's."""
        own = {f.name for f in dataclasses.fields(cls)} - {"bridge_options", "format_version", "library_version"}
        top = {k: v for k, v in options.items() if k in own}
        rest = {k: v for k, v in options.items() if k not in own}
        bridge = top.get("bridge", cls.bridge)
        unknown = sorted(set(rest) - set(option_names(bridge)))
        if unknown:
            raise LLMModulesError(
                f"unknown option(s) {unknown} for bridge {bridge!r}; its options: {', '.join(option_names(bridge))}; "
                f"composition options: {', '.join(sorted(own - {'large', 'small'}))}"
            )
        return cls(large=large, small=small, bridge_options=rest, **top)

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
        if not isinstance(data, dict):
            raise LLMModulesError(f"{path} must hold a JSON object")
        if "format_version" not in data:  # format 1: the paper's bridge, its options at the top level
            options = {k: data.pop(k) for k in _FORMAT_1_BRIDGE_KEYS if k in data}
            data = {**data, "bridge": "eca", "bridge_options": options, "format_version": CONFIG_FORMAT}
        if data.get("format_version") == 2:  # gates trained as tanh(alpha): temperature 1
            if data.get("bridge") in GATED_BRIDGES and isinstance(data.get("bridge_options"), dict):
                data["bridge_options"] = {"gate_temperature": 1.0, **data["bridge_options"]}
            data["format_version"] = CONFIG_FORMAT
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LLMModulesError(f"{path} has unknown keys {unknown}; was it written by a newer llm-modules?")
        return cls(**data)
