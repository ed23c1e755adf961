"""Decoding a fixed batch of prompts, with one KV cache per stage (large model, bridge, small model).

With the cache, each new token costs one decode step of the large model, one append to the
bridge's cross-attention keys/values and one decode step of the small model. Causality makes
this exact: under greedy decoding the tokens equal a full recompute (`use_cache=False`).
Sampling, repetition penalty and min-new-tokens reuse transformers' logits processors.
The decoding itself is the engine's (`llm_modules.decoding.engine.DecodeBatch`), the one path every
caller takes: this function, `llm-modules generate` and `chat`, evaluation and the server.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import torch

from llm_modules.decoding.engine import DecodeBatch, Sequence, model_eos_ids
from llm_modules.decoding.limits import check_room, model_positions, new_token_room
from llm_modules.decoding.sampling import SamplingOptions
from llm_modules.decoding.speculative.batch import SpeculativeBatch
from llm_modules.errors import LLMModulesError


def _in_eval_mode(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run `fn(model, ...)` with the model in eval mode, then give it back its mode."""

    @functools.wraps(fn)
    def run(model: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            return fn(model, *args, **kwargs)
        finally:
            model.train(was_training)

    return run


@torch.no_grad()
@_in_eval_mode
def generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    options: SamplingOptions | None = None,
    *,
    pad_token_id: int | None = None,
    tokenizer: Any = None,
    streamer: Any = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    drafter: Any = None,
    fit_to_limit: bool = False,
    **sampling: Any,
) -> torch.Tensor:
    """Generate up to `options.max_new_tokens` tokens; returns (B, prompt + new) ids including the prompt.

    `model` is an LLMModulesModel or a plain Hugging Face causal LM. How to decode is `options` (a
    SamplingOptions), or keywords naming its fields (`max_new_tokens=64, do_sample=True, top_p=0.9`;
    `eos_token_id` as in transformers), which override `options`' values. Prompts with padding must be
    LEFT-padded (new tokens are appended on the right); a row that ends early is filled with
    `pad_token_id` (default: the first EOS id). `generator` draws the samples (default: one seeded
    with `options.seed`, else torch's global one). `streamer` follows transformers' streamer protocol
    (`put(ids)`, `end()`), e.g. TextStreamer; `on_token(ids)` is a plain callback with the (B,) ids of
    each step. `drafter` (a `speculative.proposer.Proposer`, e.g. the composed model's `ComposedProposer`) decodes
    speculatively: the same tokens (greedy) or the same distribution (sampling), in fewer passes of `model`.
    A prompt plus `max_new_tokens` must fit the positions the model can place, less what the drafter's verify
    pass reserves (`decoding_limits`): checked before decoding (LLMModulesError, one line); with `fit_to_limit`
    each row instead stops at the limit (a row whose prompt fills it gets no new tokens).
    """
    options = (options or SamplingOptions()).updated(**sampling)
    generator = generator if generator is not None else options.generator()
    device = model.device
    ids = input_ids.to(device)
    mask = (attention_mask if attention_mask is not None else torch.ones_like(ids)).to(device)
    if mask.shape != ids.shape:
        raise LLMModulesError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}")
    if mask.shape[0] > 1 and bool((mask[:, -1] == 0).any()):
        raise LLMModulesError("batched prompts must be left-padded for generation (a row ends with padding)")
    config = getattr(model, "config", None)
    if use_cache and getattr(config, "causal", True) is False:
        warnings.warn("causal=False: cached decoding differs from a full recompute (the leak reads later states)")
    if options.max_new_tokens < 1:
        return ids
    eos = options.eos_token_ids if options.eos_token_ids is not None else model_eos_ids(model, tokenizer)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    batch = DecodeBatch(model, pad, use_cache) if drafter is None else SpeculativeBatch(model, drafter, pad)
    usable, own = batch.max_positions, model_positions(model)
    rows: list[Sequence | None] = []  # None: a row with no room left (fit_to_limit)
    for row, keep in zip(ids, mask):
        prompt = row[keep.bool()].tolist()
        n = options.max_new_tokens
        if fit_to_limit:
            room = new_token_room(len(prompt), usable)
            n = n if room is None else min(n, room)
        else:
            check_room(len(prompt), n, usable, own)  # before any decoding
        fitted = options if n == options.max_new_tokens else options.updated(
            max_new_tokens=max(n, 0), min_new_tokens=min(options.min_new_tokens, max(n, 0)))
        rows.append(Sequence(prompt, fitted, eos, tokenizer, generator) if n > 0 else None)
    live = [r for r in rows if r is not None]
    batch.add(live)
    _raise_failure(live)
    if streamer is not None:
        streamer.put(ids.cpu())
    steps = 0  # new positions given out so far (a speculative step may add several per row)
    while batch.rows:
        batch.step()
        _raise_failure(live)
        tokens = _tokens(rows)
        for _ in range(steps, max(len(t) for t in tokens)):
            steps += 1
            step_ids = torch.tensor([t[steps - 1] if len(t) >= steps else pad for t in tokens])  # (B,)
            if streamer is not None:
                streamer.put(step_ids)
            if on_token is not None:
                on_token(step_ids.to(device))
    if streamer is not None:
        streamer.end()
    new = torch.tensor([t + [pad] * (steps - len(t)) for t in _tokens(rows)], dtype=ids.dtype, device=device)
    return torch.cat([ids, new.view(len(rows), steps)], dim=1)


def decoding_limits(model: Any, drafter: Any = None) -> tuple[int | None, int | None]:
    """(the positions a prompt and its new tokens may fill when `generate` decodes `model`, with `drafter` if
    given: the model's limit less what each verify pass reserves; the model's own limit). None: no limit."""
    own = model_positions(model)
    return (own if drafter is None else SpeculativeBatch(model, drafter).max_positions), own


def _tokens(rows: list[Sequence | None]) -> list[list[int]]:
    return [[] if r is None else r.tokens for r in rows]


def _raise_failure(rows: list[Sequence]) -> None:
    """A fixed batch is one call: the first row that failed fails it, with that row's own exception."""
    failed = next((r for r in rows if r.exception is not None), None)
    if failed is not None:
        raise failed.exception
