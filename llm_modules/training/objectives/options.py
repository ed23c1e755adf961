"""Each method's own options, one dataclass per method (PEFT's `LoraConfig` beside its tuner), validated on
construction; what the method asks of the rest of a run is said by class attributes the run's config reads.

The options every method shares (data, optimisation, evaluation, hardware, composition) are the groups
of `training.config`; a method's class holds only what no other method has. This module imports no
model code, so the command line can list every method's options cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from llm_modules.errors import LLMModulesError


def flag(name: str) -> str:
    """An option's command-line name: draft_tokens -> --draft-tokens."""
    return "--" + name.replace("_", "-")


def check_ints(options: Any, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """Integer options of `options` that must be >= 1 (positive) or >= 0: else one clear error naming the flag."""
    for name in positive + non_negative:
        value, low = getattr(options, name), 1 if name in positive else 0
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise LLMModulesError(f"{flag(name)} must be an integer >= {low}, got {value!r}")


def check_positive(options: Any, *names: str) -> None:
    """Numeric options that must be > 0."""
    for name in names:
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise LLMModulesError(f"{flag(name)} must be > 0, got {value!r}")


def check_choices(options: Any, choices: dict[str, tuple[str, ...]]) -> None:
    """Options of `options` with a fixed set of values (those of `choices` it has)."""
    for name, allowed in choices.items():
        if hasattr(options, name) and getattr(options, name) not in allowed:
            raise LLMModulesError(f"{flag(name)} must be one of {', '.join(allowed)}, got {getattr(options, name)!r}")


@dataclass
class MethodOptions:
    """What a method adds to a run. Subclasses are dataclasses of the method's own options; these class
    attributes say what the method asks of the run (checked by `TrainConfig`, which never asks a method's name).
    """

    specs: ClassVar[tuple[str, ...]] = ("large", "small")  # the model specs the method needs
    composes: ClassVar[bool] = False  # builds a composed model: takes the composition group and a bridge
    frozen_large: ClassVar[bool] = True  # reads a frozen large model: its loading options apply
    # composition defaults where they differ from ComposeConfig's (a composing method only)
    compose_defaults: ClassVar[dict[str, str]] = {}
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}  # options with a fixed set of values
    # the method's recipe: options of any group, by command-line name, that apply when neither the command line
    # nor a config file gives them (so `train --method M --large SPEC --output DIR` alone runs the measured recipe)
    run_defaults: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        check_choices(self, self.choices)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def check_run(self, config: Any) -> None:
        """Rules between this method and the shared groups of `config` (a `TrainConfig`); none by default."""


@dataclass
class ComposedOptions(MethodOptions):
    """composed (ours): bridge + small model + head over the frozen large model. Its options are the shared
    composition group's; it has none of its own."""

    composes: ClassVar[bool] = True


@dataclass
class FinetuneOptions(MethodOptions):
    """finetune: the small model alone, every weight."""

    specs: ClassVar[tuple[str, ...]] = ("small",)
    frozen_large: ClassVar[bool] = False


@dataclass
class LoraOptions(MethodOptions):
    """lora: LoRA adapters on every linear layer of the large model (alpha = 2 x rank)."""

    specs: ClassVar[tuple[str, ...]] = ("large",)
    frozen_large: ClassVar[bool] = False
    lora_rank: int = 8

    def __post_init__(self) -> None:
        check_ints(self, positive=("lora_rank",))

    def check_run(self, config: Any) -> None:
        if config.hardware.fsdp:
            raise LLMModulesError("--fsdp with --method lora fails inside FSDP's state-dict gathering (seen on a GPU "
                                  "with torch 2.11: the large model's frozen embeddings go missing); train LoRA under "
                                  "DDP (leave out --fsdp): its trained adapters are small")


@dataclass
class DistillOptions(MethodOptions):
    """distill: a large-vocabulary student built from the small model, trained by KL to the large model."""

    choices: ClassVar[dict[str, tuple[str, ...]]] = {"distill_init": ("mapped", "random")}
    distill_temperature: float = 1.0  # softmax temperature of the KL
    distill_init: str = "mapped"  # the student's new embeddings: the small model's own, mapped, or random

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.distill_temperature > 0:
            raise LLMModulesError("--distill-temperature must be > 0")


@dataclass
class DrafterOptions(MethodOptions):
    """drafter: the composed model trained to draft the large model's next tokens (speculative decoding).

    Its composition defaults: it reads the large model's frozen output embedding (EAGLE reuses the target's LM
    head) and must see the tokens it drafts itself (with "bridge" inputs the newest token reaches it only through
    large states it does not have yet); its bridge is the ladder, whose drafters agreed with Qwen2.5-Coder-1.5B's
    next token 2.4-2.6x as often as the paper's bridge's (reports/speculative).
    """

    composes: ClassVar[bool] = True
    compose_defaults: ClassVar[dict[str, str]] = {"head": "projected", "small_inputs": "mapped", "bridge": "ladder"}
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"drafter_loss": ("kl", "ce"),
                                                     "drafter_targets": ("logits", "generated"),
                                                     "drafter_layout": ("composed", "eagle3")}
    # `train --method drafter --large SPEC --output DIR` alone: a drafter for any prompt (issue 36), trained on the
    # target's own answers to prompts it writes itself, sized to about 30 minutes on a 2-core CPU with
    # Qwen2.5-Coder-1.5B (docs/drafting.md has what it saw, the time each stage took and its Spec-Bench numbers)
    run_defaults: ClassVar[dict[str, Any]] = {
        "small": "smollm2-135m-instruct", "small_layers": 2,
        "data": "self-prompts:256", "template": "chat", "max_length": 256, "val_fraction": 0.05,
        "drafter_targets": "generated", "draft_vocab": 8192,
        "large_dtype": "auto", "batch_size": 8, "epochs": 6, "lr_small": 1e-3, "lr_bridge": 2e-3,
        "eval_every": 50, "save_every": 50, "num_samples": 0}
    draft_tokens: int = 4  # K
    drafter_loss: str = "kl"
    drafter_targets: str = "logits"
    draft_vocab: int = 0  # the N most frequent answer tokens, then the lowest ids (0: the whole vocabulary)
    drafter_layout: str = "composed"  # or eagle3: one EAGLE-3 draft layer over three taps (objectives.eagle3_drafter)

    def __post_init__(self) -> None:
        from llm_modules.models.drafter import check_draft_tokens  # here: the bound a saved record obeys too

        check_ints(self, positive=("draft_tokens",), non_negative=("draft_vocab",))
        check_draft_tokens(self.draft_tokens)
        super().__post_init__()

    def check_run(self, config: Any) -> None:
        if config.compose.head == "own":
            raise LLMModulesError("--head own cannot draft: a drafter drafts the large model's tokens, and the own "
                                  "head predicts the small model's; use --head projected (the drafter's default) or new")
        if config.compose.head == "residual":
            raise LLMModulesError("--head residual cannot draft: it adds the large model's logits at the very position "
                                  "it predicts, which a drafter does not have yet; use --head projected (the drafter's "
                                  "default) or new")
        if config.data is not None and config.data.spec.startswith("self-prompts:") and self.drafter_targets != "generated":
            raise LLMModulesError("--data self-prompts: the prompts the large model writes have no answers; train on "
                                  "its own answers to them with --drafter-targets generated")
        if self.drafter_layout == "eagle3" and config.eval.num_samples:
            raise LLMModulesError("--drafter-layout eagle3 writes no text samples (it drafts for the target); use "
                                  "--num-samples 0")
        if not config.hardware.state_cache:
            raise LLMModulesError("--method drafter trains from the state cache (its targets are the large model's "
                                  "cached final states through its head); leave out --no-state-cache")
