"""Loading a model to run it: `generate`, `chat`, `eval` and `serve` all load through `load_model`.

What it takes: a folder written by save_pretrained or train (a composed model, or a plain method's:
finetune, lora, distill), a training run folder (its best/, else last/), or a plain model spec (a
baseline). Every kind comes back with its tokenizer, in eval mode, in `dtype` on `device`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm_modules.errors import LLMModulesError
from llm_modules.models.saved import is_run_folder, resolve_model_folder, saved_kind


@dataclass
class RunnableModel:
    """A model ready to decode or score and its tokenizer; `composed` tells an LLMModulesModel from a
    plain Hugging Face causal LM (a plain method's or a baseline)."""

    model: nn.Module
    tokenizer: Any
    composed: bool
    drafter: Any = None  # a speculative proposer when decoding speculatively (load_drafter)


def load_model(spec: str, device: Any = None, dtype: torch.dtype = torch.float32,
               allow_large_mismatch: bool = False) -> RunnableModel:
    """A saved model folder or run folder (composed or plain), else a plain model spec, loaded in `dtype`
    onto `device` (default: where it loads, the CPU). A model without a tokenizer is an error."""
    path = Path(spec)
    if saved_kind(path) is not None or is_run_folder(path) or (path.is_dir() and not (path / "config.json").is_file()):
        spec = str(resolve_model_folder(spec))  # errors name what a model folder holds
    kind = saved_kind(spec)
    if kind == "composed":
        from llm_modules.models.composed import LLMModulesModel

        model = LLMModulesModel.from_pretrained(spec, dtype=dtype, device=device,
                                                allow_large_mismatch=allow_large_mismatch)
        tokenizer, what = model.tokenizer, f"the large model of {spec} ({model.config.large})"
    elif kind == "plain":
        from llm_modules.models.plain import load_plain

        model, tokenizer = load_plain(spec)
        model, what = model.to(device=device, dtype=dtype), spec
    else:
        from llm_modules.models.specs import resolve_model

        loaded = resolve_model(spec, dtype=dtype)
        model = loaded.model.to(device) if device is not None else loaded.model
        tokenizer, what = loaded.tokenizer, f"model {spec!r}"
    if tokenizer is None:
        raise LLMModulesError(f"{what} has no tokenizer files; generating and scoring text need them")
    return RunnableModel(model.eval(), tokenizer, kind == "composed")


def load_drafter(folder: str, target: RunnableModel, spec: str, draft_tokens: int | None = None,
                 allow_large_mismatch: bool = False, lookup: bool = True) -> Any:
    """The drafter saved in `folder` (train --method drafter), drafting for `target` (loaded from `spec`),
    which must be the large model the drafter was trained on: it is shared, not loaded again, and checked
    against the drafter's record of it. `draft_tokens` defaults to the K it trained with; it drafts from the
    draft vocabulary it trained with, if any. With `lookup`, rows whose context holds an n-gram match take
    prompt lookup's copy instead (`LookupFirst`). `folder` PROMPT_LOOKUP ("prompt-lookup") drafts by copying
    from each row's own context instead, no drafter needed (a folder of that name: "./prompt-lookup")."""
    from llm_modules.decoding.limits import model_positions
    from llm_modules.decoding.speculative.composed_proposer import ComposedProposer
    from llm_modules.decoding.speculative.lookup_first import LookupFirst
    from llm_modules.decoding.speculative.prompt_lookup import (
        PROMPT_LOOKUP,
        PromptLookup,
    )
    from llm_modules.models.composed import LLMModulesModel
    from llm_modules.models.drafter import (
        DrafterRecord,
        check_draft_tokens,
        load_draft_vocab,
    )
    from llm_modules.models.eagle3_folder import eagle3_folder
    from llm_modules.models.specs import LoadedModel

    if target.composed:
        raise LLMModulesError(f"--draft drafts for a plain model (the large model the drafter was trained on); "
                              f"{spec} is a composed model")
    if draft_tokens is not None:
        check_draft_tokens(draft_tokens)
    if folder == PROMPT_LOOKUP:
        k = draft_tokens if draft_tokens is not None else PromptLookup.DEFAULT_TOKENS
        _check_room(k, [model_positions(target.model)], draft_tokens is not None)
        return PromptLookup(target.model.config.get_text_config().vocab_size, draft_tokens=k)
    if eagle3_folder(folder) is not None:
        return _eagle3_proposer(folder, target, draft_tokens, lookup)
    where = resolve_model_folder(folder)
    record = DrafterRecord.load(where)
    if record is None:
        raise LLMModulesError(f"{folder} is not a drafter (no drafter record: train it with --method drafter)")
    vocab = load_draft_vocab(where, record, getattr(target.model.config.get_text_config(), "vocab_size", None))
    first = next(target.model.parameters())
    drafter = LLMModulesModel.from_pretrained(where, dtype=first.dtype, device=first.device,
                                              allow_large_mismatch=allow_large_mismatch,
                                              large=LoadedModel(target.model, target.tokenizer, spec, "shared"))
    k = draft_tokens if draft_tokens is not None else record.draft_tokens
    _check_room(k, [model_positions(target.model), drafter.small_max_positions], draft_tokens is not None)
    pad = target.tokenizer.pad_token_id if target.tokenizer.pad_token_id is not None else 0
    proposer = ComposedProposer(drafter.eval(), draft_tokens=k, pad_id=pad, vocab=vocab)
    return LookupFirst(proposer, PromptLookup(drafter.vocab_size, draft_tokens=k)) if lookup else proposer


def _eagle3_proposer(folder: str, target: RunnableModel, draft_tokens: int | None, lookup: bool) -> Any:
    """An EAGLE-3 drafter (ours, speculators' or EAGLE's plain layout) drafting for `target`, sharing its input
    embedding when the folder holds none. K: --draft-tokens, else the drafter's record, else the folder's, else 3."""
    from llm_modules.decoding.limits import model_positions
    from llm_modules.decoding.speculative.eagle3_proposer import Eagle3Proposer
    from llm_modules.decoding.speculative.lookup_first import LookupFirst
    from llm_modules.decoding.speculative.prompt_lookup import PromptLookup
    from llm_modules.models.eagle3_folder import eagle3_folder, eagle3_record, load_eagle3

    config = target.model.config.get_text_config()
    first = next(target.model.parameters())
    embeddings = target.model.get_input_embeddings().weight.detach()
    network, named_k = load_eagle3(folder, embeddings=embeddings, target_layers=config.num_hidden_layers,
                                   dtype=first.dtype, device=first.device)
    c = network.config
    if c.vocab_size != config.vocab_size or c.target_hidden_size != config.hidden_size:
        raise LLMModulesError(f"{folder} drafts for a target of vocabulary {c.vocab_size} and width "
                              f"{c.target_hidden_size}; --model has {config.vocab_size} and {config.hidden_size}")
    if c.taps[-1] >= config.num_hidden_layers:
        raise LLMModulesError(f"{folder} reads layer {c.taps[-1]} of a {config.num_hidden_layers}-layer target: "
                              "tap L is the state before the final norm in vLLM, which this engine's target "
                              "stepper does not give (it gives the normed one); taps must be below L")
    record = eagle3_record(eagle3_folder(folder))
    k = draft_tokens or (record.draft_tokens if record else None) or named_k or 3
    _check_room(k, [model_positions(target.model), c.max_position_embeddings], draft_tokens is not None)
    pad = target.tokenizer.pad_token_id if target.tokenizer.pad_token_id is not None else 0
    proposer = Eagle3Proposer(network, draft_tokens=k, pad_id=pad)
    return LookupFirst(proposer, PromptLookup(config.vocab_size, draft_tokens=k)) if lookup else proposer


def _check_room(k: int, limits: list[int | None], asked: bool) -> None:
    """A verify pass reads K + 1 positions ahead: refuse a K that leaves no prompt token and new token to place."""
    limits = [n for n in limits if n]
    if limits and min(limits) - k - 1 < 2:
        what = f"--draft-tokens {k}" if asked else f"the drafter's draft_tokens ({k})"
        raise LLMModulesError(f"{what} leaves no room in the {min(limits)} positions the model and its drafter can "
                              f"place: each verify pass reads K + 1 positions ahead; use at most {min(limits) - 3}")
