"""What the one training loop trains: per method, a model and a loss (TRL's trainer = model + loss).

    composed   LLMModulesModel: frozen large -> bridge -> small -> head, from cached large states
    finetune   a plain causal LM, every weight (the small model alone, in the reports)
    lora       a plain causal LM with LoRA adapters on every linear layer (peft)
    distill    a student over the LARGE vocabulary (the small model's body, new tied embeddings)
               trained by forward KL to the frozen large model's next-token distribution
    drafter    the composed model trained to draft the large model's next tokens for speculative
               decoding: it reads the large states only up to the last verified token (blocks of K),
               its targets the large model's own logits (objectives.drafter)

Each method registers its own options dataclass (`options.py`: `LoraOptions`, `DrafterOptions`, ...) with
what builds its objective in `METHODS`, as `bridges.BRIDGES` registers a bridge and PEFT a tuner
(`register_method` adds one). The options every method shares are `training.config`'s groups.

`training.loop` owns the loop (batches, schedule, clipping, evaluation, checkpoints, resume); an
objective only says which parameters train at which rate, what the training loss of a batch is,
and how its trained weights are saved and loaded. Every loss is a SUM over answer positions, so
the loop divides by the step's answer-token count whatever the method. Validation scores
cross-entropy of the real answer tokens (`eval_loss_sum`), also for distillation, so curves of
every method are in the same unit (bits per byte of answer text, see `evaluation.harness`); only the
drafter validates its own loss, and its top-1 agreement with the large model (what decides its speed).

A plain method's folder: `model.safetensors` (its trained tensors only), `llm_modules_plain.json`
(method, base spec, options) and the tokenizer files; `load_plain` rebuilds the model from the
base spec and loads the tensors. Nothing is pickled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llm_modules.errors import LLMModulesError
from llm_modules.training.objectives.base import Objective
from llm_modules.training.objectives.options import (
    ComposedOptions,
    DistillOptions,
    DrafterOptions,
    FinetuneOptions,
    LoraOptions,
    MethodOptions,
)

# Builds a method's objective from a TrainConfig, the device and the process count (which place a frozen
# large model). The builders import their objective when called: the options stay cheap to list.
Build = Callable[[Any, Any, int], Objective]


def _composed(config: Any, device: Any = "cpu", processes: int = 1) -> Objective:
    from llm_modules.training.objectives.composed import ComposedObjective

    return ComposedObjective(config, device, processes)


def _drafter(config: Any, device: Any = "cpu", processes: int = 1) -> Objective:
    if config.method_options.drafter_layout == "eagle3":
        from llm_modules.training.objectives.eagle3_drafter import Eagle3Objective

        return Eagle3Objective(config, device, processes)
    from llm_modules.training.objectives.drafter import DrafterObjective

    return DrafterObjective(config, device, processes)


def _plain(config: Any, device: Any = "cpu", processes: int = 1) -> Objective:
    from llm_modules.training.objectives.baselines import plain_objective

    return plain_objective(config, device, processes)


# {name: (options dataclass, objective builder)}, as `bridges.BRIDGES` and PEFT's `register_peft_method`
METHODS: dict[str, tuple[type[MethodOptions], Build]] = {
    "composed": (ComposedOptions, _composed),
    "finetune": (FinetuneOptions, _plain),
    "lora": (LoraOptions, _plain),
    "distill": (DistillOptions, _plain),
    "drafter": (DrafterOptions, _drafter),
}


def register_method(name: str, options_class: type[MethodOptions], build: Build) -> None:
    """Add a method: its options dataclass (a `MethodOptions`) and what builds its objective."""
    if name in METHODS:
        raise LLMModulesError(f"method {name!r} is registered already")
    if not issubclass(options_class, MethodOptions):
        raise LLMModulesError(f"the options of method {name!r} must subclass MethodOptions")
    METHODS[name] = (options_class, build)


def method_classes(name: str) -> tuple[type[MethodOptions], Build]:
    """(options dataclass, objective builder) of the method `name`; an unknown name is a clear error."""
    if name not in METHODS:
        raise LLMModulesError(f"--method must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]


def build_objective(config: Any, device: Any = "cpu", processes: int = 1) -> Objective:
    """The objective of a TrainConfig's `method`; `device` and `processes` place a frozen large model."""
    return method_classes(config.method)[1](config, device, processes)


__all__ = ["METHODS", "MethodOptions", "Objective", "build_objective", "method_classes", "register_method"]
