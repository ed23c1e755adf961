"""How one request decodes, as one object: built once where the request comes in (the CLI's flags, the
server's request body, lm-eval's gen_kwargs, `generate`'s keywords) and handed down to the engine unchanged."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llm_modules.errors import LLMModulesError

# Below this a sampling temperature overflows float32 logits to inf (1e-300: every score inf or NaN);
# 0.01 is vLLM's floor too. Temperature 0 means greedy, asked for with do_sample=False.
MIN_TEMPERATURE = 0.01
# The repetition penalty divides a repeated token's positive logit and multiplies its negative one: 1e-40
# turns a logit of 1 into 1e40, past float32 (inf, then NaN probabilities when sampling). Within
# [1/100, 100] a logit of a few hundred stays finite even at MIN_TEMPERATURE; useful values are 1 to 2.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0


@dataclass
class SamplingOptions:
    """How one request decodes. Greedy unless `do_sample`; `eos_token_ids` None: the model's own;
    `seed` fixes the draws (None: `generate` draws from torch's global generator, the engine from a
    fresh one). `max_new_tokens=0` asks for nothing: `generate` returns the prompt."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_strings: list[str] | None = None
    eos_token_ids: list[int] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise LLMModulesError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise LLMModulesError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise LLMModulesError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.do_sample and self.temperature < MIN_TEMPERATURE:
            raise LLMModulesError(f"temperature must be >= {MIN_TEMPERATURE} when sampling (0 decodes greedily), "
                                  f"got {self.temperature}")
        if self.seed is not None and not -2**63 <= self.seed < 2**64:
            raise LLMModulesError(f"seed must be in [-2**63, 2**64), got {self.seed}")
        if not 0.0 < self.top_p <= 1.0:
            raise LLMModulesError(f"top_p must be in (0, 1], got {self.top_p}")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise LLMModulesError(f"repetition_penalty must be between {MIN_REPETITION_PENALTY} and "
                                  f"{MAX_REPETITION_PENALTY:g} (1: none), got {self.repetition_penalty}")

    def updated(self, **keywords: Any) -> "SamplingOptions":
        """A copy with `keywords` (field names; transformers' `eos_token_id`, an id or a list, is accepted
        for `eos_token_ids`) replacing this object's values; an unknown name is a TypeError."""
        if "eos_token_id" in keywords:
            eos = keywords.pop("eos_token_id")
            keywords["eos_token_ids"] = None if eos is None else [eos] if isinstance(eos, int) else list(eos)
        unknown = sorted(set(keywords) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown sampling options {unknown}")
        return dataclasses.replace(self, **keywords)

    def generator(self) -> torch.Generator | None:
        """A CPU generator seeded with `seed` (the rows' draws run on the CPU), or None without a seed."""
        return None if self.seed is None else torch.Generator(device="cpu").manual_seed(self.seed)

    def processors(self, prompt_length: int, eos_ids: list[int]) -> LogitsProcessorList:
        """transformers' own processors, in the order its generate() applies them."""
        processors = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(penalty=self.repetition_penalty))
        if self.min_new_tokens > 0 and eos_ids:
            processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, self.min_new_tokens, eos_ids))
        if self.do_sample:
            if self.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                processors.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                processors.append(TopPLogitsWarper(self.top_p))
        return processors
