"""What the one training loop trains: per method, a model and a loss (TRL's trainer = model + loss).

    composed   LLMModulesModel: frozen large -> bridge -> small -> head, from cached large states
    finetune   a plain causal LM, every weight (the small model alone, in the reports)
    lora       a plain causal LM with LoRA adapters on every linear layer (peft)
    distill    a student over the LARGE vocabulary (the small model's body, new tied embeddings)
               trained by forward KL to the frozen large model's next-token distribution
    drafter    the composed model trained to draft the large model's next tokens for speculative
               decoding: it reads the large states only up to the last verified token (blocks of K),
               its targets the large model's own logits (objectives.drafter)

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

from typing import Any

from llm_modules.training.objectives.base import Objective

METHODS = ("composed", "finetune", "lora", "distill", "drafter")


def build_objective(config: Any, device: Any = "cpu", processes: int = 1) -> Objective:
    """The objective of a TrainConfig's `method`; `device` and `processes` place a frozen large model."""
    if config.method == "composed":
        from llm_modules.training.objectives.composed import ComposedObjective

        return ComposedObjective(config, device, processes)
    if config.method == "drafter":
        from llm_modules.training.objectives.drafter import DrafterObjective

        return DrafterObjective(config, device, processes)
    from llm_modules.training.objectives.plain import plain_objective

    return plain_objective(config, device, processes)
