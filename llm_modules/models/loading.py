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
               allow_large_mismatch: bool = False, cpu_linear: str = "auto") -> RunnableModel:
    """A saved model folder or run folder (composed or plain), else a plain model spec, loaded in `dtype`
    onto `device` (default: where it loads, the CPU). A model without a tokenizer is an error. `cpu_linear`
    (`models.cpu_linear.use_cpu_linear`): the kernel a plain model's linear layers, or a composed one's large
    model's, decode with on a CPU."""
    from llm_modules.models.cpu_linear import use_cpu_linear

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
    model.eval()
    use_cpu_linear(model.large if kind == "composed" else model, cpu_linear)
    return RunnableModel(model, tokenizer, kind == "composed")


@dataclass(frozen=True)
class DraftOptions:
    """How a plain model decodes speculatively (`--draft`, `--draft-tokens`, `--draft-lookup`, `--draft-width`):
    `source` a drafter folder (train --method drafter) or PROMPT_LOOKUP ("prompt-lookup": copies from each row's
    context, no drafter); `tokens` the drafter's K (default: the K it trained with; prompt lookup's own default
    alone); `lookup` prompt lookup's copy joins a drafter's drafts in the same verify pass; `width` the draft
    tree's width: the drafter's chain plus its width - 1 runners-up at every depth (default:
    `TreeProposer.DEFAULT_WIDTH`); `adaptive` each pass drafts, per row, only what is predicted to pay at the
    batch's size (`DraftPolicy`; off: every row drafts the whole tree every pass)."""

    source: str
    tokens: int | None = None
    lookup: bool = True
    width: int | None = None
    adaptive: bool = True

    def __post_init__(self) -> None:
        from llm_modules.models.drafter import check_draft_tokens

        if self.tokens is not None:
            check_draft_tokens(self.tokens)
        if self.width is not None and not 1 <= self.width <= MAX_DRAFT_WIDTH:
            raise LLMModulesError(f"--draft-width must be between 1 and {MAX_DRAFT_WIDTH}, got {self.width}")


MAX_DRAFT_WIDTH = 16  # runners-up per depth: each adds K nodes to every verify pass


def load_drafter(draft: DraftOptions, target: RunnableModel, spec: str, allow_large_mismatch: bool = False) -> Any:
    """The proposer `draft` describes, drafting for `target` (loaded from `spec`). A drafter folder's large model
    must be the target: it is shared, not loaded again, and checked against the drafter's record of it; it drafts
    from the draft vocabulary it trained with, if any. With a drafter, each verify pass checks a draft tree
    (`TreeProposer`): the drafter's chain, its runners-up (`width` > 1) and, with `lookup`, prompt lookup's copy;
    width 1 without lookup is the drafter's chain alone (`ComposedProposer`). PROMPT_LOOKUP (a folder of that
    name: "./prompt-lookup") drafts by copying from each row's own context instead, no drafter needed."""
    from llm_modules.decoding.limits import model_positions
    from llm_modules.decoding.speculative.composed_proposer import ComposedProposer
    from llm_modules.decoding.speculative.prompt_lookup import (
        PROMPT_LOOKUP,
        PromptLookup,
    )
    from llm_modules.models.composed import LLMModulesModel
    from llm_modules.models.drafter import DrafterRecord, load_draft_vocab
    from llm_modules.models.eagle3_folder import eagle3_folder
    from llm_modules.models.specs import LoadedModel

    if target.composed:
        raise LLMModulesError(f"--draft drafts for a plain model (the large model the drafter was trained on); "
                              f"{spec} is a composed model")
    vocab_size = target.model.config.get_text_config().vocab_size
    if draft.source == PROMPT_LOOKUP:
        if draft.width not in (None, 1):
            raise LLMModulesError("--draft-width needs a drafter: prompt lookup copies one continuation per row")
        k = draft.tokens if draft.tokens is not None else PromptLookup.DEFAULT_TOKENS
        _check_room(k, [model_positions(target.model)], _asked(draft, k, "prompt lookup's default K"))
        return _with_policy(PromptLookup(vocab_size, draft_tokens=k), draft)
    if eagle3_folder(draft.source) is not None:
        return _eagle3_proposer(draft, target)
    where = resolve_model_folder(draft.source)
    record = DrafterRecord.load(where)
    if record is None:
        raise LLMModulesError(f"{draft.source} is not a drafter (no drafter record: train it with --method drafter)")
    vocab = load_draft_vocab(where, record, vocab_size)
    first = next(target.model.parameters())
    drafter = LLMModulesModel.from_pretrained(where, dtype=first.dtype, device=first.device,
                                              allow_large_mismatch=allow_large_mismatch,
                                              large=LoadedModel(target.model, target.tokenizer, spec, "shared"))
    k = draft.tokens if draft.tokens is not None else record.draft_tokens
    limits = [model_positions(target.model), drafter.small_max_positions]
    _check_room(k, limits, _asked(draft, k, "the drafter's draft_tokens"))
    proposer = ComposedProposer(drafter.eval(), draft_tokens=k, pad_id=_pad(target), vocab=vocab)
    return _drafting(proposer, draft, limits, vocab_size)


def _drafting(proposer: Any, draft: DraftOptions, limits: list[int | None], vocab_size: int) -> Any:
    """A drafter's proposer as `draft` asks it to draft: in a tree with its runners-up and prompt lookup's copy
    (`TreeProposer`), or its chain alone (width 1, no lookup); with the drafting policy when adaptive."""
    from llm_modules.decoding.speculative.prompt_lookup import PromptLookup
    from llm_modules.decoding.speculative.tree_proposer import TreeProposer

    width = draft.width if draft.width is not None else TreeProposer.DEFAULT_WIDTH
    lookup = PromptLookup(vocab_size) if draft.lookup else None
    if lookup is not None:
        _check_room(lookup.draft_tokens, limits, f"prompt lookup's copy of up to {lookup.draft_tokens} tokens "
                                                 "(--no-draft-lookup leaves it out)")
    if width == 1 and lookup is None:
        return _with_policy(proposer, draft)
    return _with_policy(TreeProposer(proposer, lookup, width=width), draft)


def _pad(target: RunnableModel) -> int:
    return target.tokenizer.pad_token_id if target.tokenizer.pad_token_id is not None else 0


def _eagle3_proposer(draft: DraftOptions, target: RunnableModel) -> Any:
    """An EAGLE-3 drafter (ours, speculators' or EAGLE's plain layout) drafting for `target`, sharing its input
    embedding when the folder holds none. K: --draft-tokens, else the drafter's record, else the folder's, else 3."""
    from llm_modules.decoding.limits import model_positions
    from llm_modules.decoding.speculative.eagle3_proposer import Eagle3Proposer
    from llm_modules.models.eagle3_folder import (
        eagle3_folder,
        eagle3_record,
        load_eagle3,
    )

    folder = draft.source
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
    k = draft.tokens or (record.draft_tokens if record else None) or named_k or 3
    limits = [model_positions(target.model), c.max_position_embeddings]
    _check_room(k, limits, _asked(draft, k, "the drafter's draft_tokens"))
    return _drafting(Eagle3Proposer(network, draft_tokens=k, pad_id=_pad(target)), draft, limits, config.vocab_size)


def _with_policy(proposer: Any, draft: DraftOptions) -> Any:
    """The proposer carrying the policy a SpeculativeBatch built for it drafts by (`policy`), when adaptive."""
    from llm_modules.decoding.speculative.policy import DraftPolicy

    proposer.policy = DraftPolicy() if draft.adaptive else None
    return proposer


def _asked(draft: DraftOptions, k: int, default: str) -> str:
    return f"--draft-tokens {k}" if draft.tokens is not None else f"{default} ({k})"


def _check_room(depth: int, limits: list[int | None], what: str) -> None:
    """A verify pass reads `depth` + 1 positions ahead: refuse a depth that leaves no prompt token and new token
    to place. `what` names where the depth came from."""
    limits = [n for n in limits if n]
    if limits and min(limits) - depth - 1 < 2:
        raise LLMModulesError(f"{what} leaves no room in the {min(limits)} positions the model and its drafter can "
                              f"place: each verify pass reads K + 1 positions ahead; use at most {min(limits) - 3}")
