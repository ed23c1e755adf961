"""The position limit, checked before decoding: a prompt and its new tokens must fit the positions the
model can place, less what speculative decoding reserves (a verify pass reads the drafted tokens ahead
of the last one kept). One check and one wording for generate, chat, eval and serve."""

from __future__ import annotations

from typing import Any

from llm_modules.errors import LLMModulesError


def model_positions(model: Any) -> int | None:
    """The positions `model` can place: a composed model's `max_positions` (the smaller of its two models'),
    else a Hugging Face model's `max_position_embeddings`; None when it states none."""
    limit = getattr(model, "max_positions", None)
    if isinstance(limit, int) or limit is None and hasattr(model, "large"):
        return limit
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def describe_limit(usable: int, model_limit: int | None = None) -> str:
    """'the 96 positions the model can place', and when decoding reserves some of them (`usable` below
    `model_limit`), how many: '... less the 5 that speculative decoding reserves'."""
    if model_limit is None or model_limit <= usable:
        return f"the {usable} positions the model can place"
    return (f"the {model_limit} positions the model can place less the {model_limit - usable} that speculative "
            f"decoding reserves (each verify pass reads the drafted tokens ahead)")


def new_token_room(prompt_tokens: int, usable: int | None) -> int | None:
    """New tokens that fit after a prompt of `prompt_tokens` (None: no limit)."""
    return None if usable is None else usable - prompt_tokens


def check_room(prompt_tokens: int, new_tokens: int, usable: int | None, model_limit: int | None = None,
               name: str = "max_new_tokens") -> None:
    """Refuse, in one line, a prompt of `prompt_tokens` plus `new_tokens` that does not fit `usable` positions
    (`model_limit`: the model's own, when decoding reserves some; `name`: what the caller calls the count)."""
    room = new_token_room(prompt_tokens, usable)
    if room is None or new_tokens <= room:
        return
    where = describe_limit(usable, model_limit)
    if room < 1:
        raise LLMModulesError(f"the prompt ({prompt_tokens} tokens) fills {where}; shorten it")
    raise LLMModulesError(f"the prompt ({prompt_tokens} tokens) plus {name} ({new_tokens}) exceeds {where}; "
                          f"ask for at most {room} new tokens")
