"""Decoding for the composed model, with one KV cache per stage (large model, bridge, small model).

With the cache, each new token costs one decode step of the large model, one append to the
bridge's cross-attention keys/values and one decode step of the small model. Causality makes
this exact: under greedy decoding the tokens equal a full recompute (`use_cache=False`).
Sampling, repetition penalty and min-new-tokens reuse transformers' logits processors.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from transformers import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .errors import LLMModulesError


def _eos_ids(model: Any, eos_token_id: int | list[int] | None) -> list[int]:
    if eos_token_id is not None:
        return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    found = getattr(getattr(model.large, "generation_config", None), "eos_token_id", None)
    if found is None and model.tokenizer is not None:
        found = model.tokenizer.eos_token_id
    if found is None:
        return []
    return [found] if isinstance(found, int) else list(found)


def build_logits_processors(
    prompt_length: int,
    eos_ids: list[int],
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    min_new_tokens: int,
    device: torch.device,
) -> LogitsProcessorList:
    """transformers' own processors, in the order its generate() applies them."""
    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty=repetition_penalty))
    if min_new_tokens > 0 and eos_ids:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, min_new_tokens, eos_ids, device=device))
    if do_sample:
        if temperature <= 0:
            raise LLMModulesError(f"temperature must be > 0 when sampling, got {temperature}")
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k and top_k > 0:
            processors.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
    return processors


class _StopStrings:
    """Marks rows finished once their generated text contains one of the stop strings."""

    def __init__(self, stop_strings: list[str], tokenizer: Any, prompt_length: int):
        if tokenizer is None:
            raise LLMModulesError("stop strings need a tokenizer; this model has none (pass tokenizer=...)")
        self.stops, self.tokenizer, self.start = stop_strings, tokenizer, prompt_length

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(ids[:, self.start :], skip_special_tokens=False)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=ids.device)


@torch.no_grad()
def generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: list[str] | None = None,
    tokenizer: Any = None,
    streamer: Any = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Generate up to `max_new_tokens` tokens; returns (B, prompt + new) ids including the prompt.

    Prompts with padding must be LEFT-padded (new tokens are appended on the right).
    `streamer` follows transformers' streamer protocol (`put(ids)`, `end()`), e.g. TextStreamer;
    `on_token(ids)` is a plain callback with the (B,) ids of each step.
    """
    was_training = model.training
    model.eval()
    try:
        return _generate(
            model, input_ids, attention_mask, max_new_tokens, min_new_tokens, do_sample, temperature, top_k,
            top_p, repetition_penalty, eos_token_id, pad_token_id, stop_strings, tokenizer, streamer, use_cache,
            generator, on_token,
        )
    finally:
        model.train(was_training)


def _generate(
    model, input_ids, attention_mask, max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p,
    repetition_penalty, eos_token_id, pad_token_id, stop_strings, tokenizer, streamer, use_cache, generator, on_token,
):
    device = model.device
    ids = input_ids.to(device)
    mask = (attention_mask if attention_mask is not None else torch.ones_like(ids)).to(device)
    if mask.shape != ids.shape:
        raise LLMModulesError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}")
    if mask.shape[0] > 1 and bool((mask[:, -1] == 0).any()):
        raise LLMModulesError("batched prompts must be left-padded for generation (a row ends with padding)")
    if not model.config.causal and use_cache:
        warnings.warn("causal=False: cached decoding differs from a full recompute (the leak reads later states)")
    if max_new_tokens < 1:
        return ids
    eos = _eos_ids(model, eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    prompt_length = ids.shape[1]
    processors = build_logits_processors(
        prompt_length, eos, do_sample, temperature, top_k, top_p, repetition_penalty, min_new_tokens, device
    )
    stops = _StopStrings(stop_strings, tokenizer or model.tokenizer, prompt_length) if stop_strings else None
    eos_tensor = torch.tensor(eos, device=device, dtype=ids.dtype)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    if streamer is not None:
        streamer.put(ids.cpu())

    out = model(input_ids=ids, attention_mask=mask, use_cache=use_cache, logits_to_keep=1)
    for step in range(max_new_tokens):
        scores = processors(ids, out.logits[:, -1].float())  # (B, V)
        if do_sample:
            probs = torch.softmax(scores, dim=-1)
            next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_ids = scores.argmax(dim=-1)  # (B,)
        next_ids = torch.where(finished, torch.full_like(next_ids, pad), next_ids)
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if streamer is not None:
            streamer.put(next_ids.cpu())
        if on_token is not None:
            on_token(next_ids)
        finished |= torch.isin(next_ids, eos_tensor)
        if stops is not None:
            finished |= stops(ids)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        if use_cache:
            out = model(input_ids=next_ids[:, None], attention_mask=mask, cache=out.cache, use_cache=True)
        else:
            out = model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    if streamer is not None:
        streamer.end()
    return ids
