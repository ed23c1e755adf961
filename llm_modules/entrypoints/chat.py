"""`llm-modules chat`: a conversation in the terminal, streamed, that never ends on what is said.

A conversation that outgrows the model's context loses its oldest exchanges (a user message and its
answer; one line says so), a message too long for the context on its own is refused, and a reply
that fails is reported in one line; the conversation goes on.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch

from llm_modules.errors import LLMModulesError

Messages = list[dict[str, str]]


def fit_conversation(history: Messages, render: Callable[[Messages], list[int]], room: int | None
                     ) -> tuple[list[int] | None, int]:
    """Token ids of the conversation (ending with the new user message) in at most `room` tokens,
    dropping its oldest exchanges as needed; returns (ids, exchanges dropped), ids None when the new
    message alone does not fit. `history` is cut in place."""
    dropped = 0
    while True:
        ids = render(history)
        if room is None or len(ids) <= room:
            return ids, dropped
        if len(history) <= 1:
            return None, dropped
        del history[:2]
        dropped += 1


def chat(loaded: Any, template: str, system: str | None, options: Any, use_cache: bool = True) -> None:
    """Read user messages until an empty line or end of input; stream each answer to stdout.
    `loaded`: a models.loading.RunnableModel (its drafter, if any, drafts); `options`: a SamplingOptions."""
    from transformers import TextStreamer

    from llm_modules.data.prompting import prompt_ids
    from llm_modules.decoding.generation import decoding_limits, generate

    model, tokenizer, max_new_tokens = loaded.model, loaded.tokenizer, options.max_new_tokens
    limit = decoding_limits(model, loaded.drafter)[0]  # with a drafter: less what its verify pass reserves
    room = None if limit is None else limit - max_new_tokens  # prompt tokens that leave room for a reply
    if room is not None and room < 1:
        raise LLMModulesError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                              f"context of {limit} tokens; lower it")
    history: Messages = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        ids, dropped = fit_conversation(history, lambda h: prompt_ids(h, tokenizer, template, system), room)
        if ids is None:
            history.clear()
            print(f"(message not sent: with --max-new-tokens {max_new_tokens} it does not fit the model's context "
                  f"of {limit} tokens; shorten it)", file=sys.stderr)
            continue
        if dropped:
            print(f"(dropped the oldest {dropped} exchange{'s' if dropped > 1 else ''} to fit the model's context of "
                  f"{limit} tokens)", file=sys.stderr)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        try:
            out = generate(model, torch.tensor([ids]), None, options, tokenizer=tokenizer, streamer=streamer,
                           use_cache=use_cache, drafter=loaded.drafter)
        except LLMModulesError as err:
            history.pop()
            print(f"\n(no reply: {err})", file=sys.stderr)
            continue
        history.append({"role": "assistant",
                        "content": tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()})
