"""finetune / lora / distill: one Hugging Face causal LM (`models.plain`) trained through the same loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llm_modules.errors import LLMModulesError
from llm_modules.losses import answer_logit_targets, answer_nll_sum
from llm_modules.models.plain import (
    PlainSpec,
    build_plain,
    load_trainable_state,
    save_plain,
    special_ids,
    trainable_state,
)
from llm_modules.training.objectives.base import Objective, large_loading


class PlainObjective(Objective):
    """finetune / lora / distill: one Hugging Face causal LM whose trainable weights are saved alone."""

    def __init__(self, spec: PlainSpec, model: nn.Module, tokenizer: Any, teacher: nn.Module | None = None,
                 temperature: float = 1.0):
        self.spec, self.method = spec, spec.method
        self.module, self.tokenizer, self.teacher, self.temperature = model, tokenizer, teacher, temperature
        self.max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)

    def param_groups(self, config: Any) -> list[dict[str, Any]]:
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        if self.method != "distill":
            return [{"params": trainable, "lr": config.train.lr_small}]
        embed = self.module.get_input_embeddings().weight  # new and random: it gets the bridge's (higher) rate
        return [{"params": [embed], "lr": config.train.lr_bridge},
                {"params": [p for p in trainable if p is not embed], "lr": config.train.lr_small}]

    def _logits(self, wrapped: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)

    def loss_sum(self, wrapped: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self._logits(wrapped, batch)
        if self.teacher is None:
            return answer_nll_sum(logits, batch["labels"])
        with torch.no_grad():
            teacher = self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            target, _ = answer_logit_targets(teacher.to(logits.device), batch["labels"])  # (N, V)
        student, _ = answer_logit_targets(logits, batch["labels"])
        t = self.temperature
        kl = F.kl_div(F.log_softmax(student.float() / t, -1), F.log_softmax(target.float() / t, -1),
                      log_target=True, reduction="sum")
        return kl * t**2

    def eval_loss_sum(self, wrapped: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return answer_nll_sum(self._logits(wrapped, batch), batch["labels"])

    def place(self, device: torch.device) -> None:
        from llm_modules.models.large import is_placed

        self.module.to(device)
        if self.teacher is not None and not is_placed(self.teacher):
            self.teacher.to(device)

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.module)

    def load_trained_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_trainable_state(self.module, state, self.method)

    def save_pretrained(self, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        return save_plain(directory, self.spec, self.module, self.tokenizer, state)

    def scorer(self) -> Any:
        from llm_modules.evaluation.harness import PlainScorer

        return PlainScorer(self.module, self.tokenizer)


def plain_objective(config: Any, device: Any = "cpu", processes: int = 1) -> PlainObjective:
    """finetune trains `config.small`, lora `config.large`; distill reads `config.large` as the
    teacher (loaded like the composed method's frozen large model) and builds its student from
    `config.small`'s body."""
    from llm_modules.models.specs import resolve_model

    if config.method == "distill":
        large = resolve_model(config.large, **large_loading(config, device, processes))
        if large.tokenizer is None:
            raise LLMModulesError(f"model {config.large!r} has no tokenizer; distillation needs one")
        teacher = large.model.eval().requires_grad_(False)
        vocab = teacher.get_output_embeddings().weight.shape[0]
        spec = PlainSpec("distill", config.small, teacher=config.large, vocab_size=vocab,
                         special_ids=special_ids(teacher, large.tokenizer),
                         student_init=config.method_options.distill_init)
        model, tokenizer = build_plain(spec, tokenizer=large.tokenizer)
        return PlainObjective(spec, model.train(), tokenizer, teacher, config.method_options.distill_temperature)
    rank = getattr(config.method_options, "lora_rank", 0)  # finetune: none
    spec = PlainSpec(config.method, config.small if config.method == "finetune" else config.large,
                     lora_rank=rank, lora_alpha=2 * rank)
    model, tokenizer = build_plain(spec)
    if config.hardware.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return PlainObjective(spec, model.train(), tokenizer)
