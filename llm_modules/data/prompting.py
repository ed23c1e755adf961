"""Prompts for generation laid out exactly as training rendered them (same template, same tokens)."""

from __future__ import annotations

from typing import Any

from llm_modules.data.prepare import Record, render

_PLACEHOLDER = "x"


def prompt_ids(messages: list[dict[str, str]], tokenizer: Any, template: str, system: str | None = None) -> list[int]:
    """Token ids that end where the next assistant answer starts.

    `messages` alternate user/assistant and end with a user turn. The conversation is rendered
    with a placeholder answer by the training renderer, then cut before the first token of that
    answer, so the prompt matches training byte for byte (system prompt, turn markers, EOS). A chat
    template is rendered twice however long the conversation (`render`'s one_render).
    """
    record = Record(system=system, messages=[*messages, {"role": "assistant", "content": _PLACEHOLDER}])
    ids, labels = render(record, tokenizer, template, "assistant", one_render=True)
    last_answer = max(i for i, label in enumerate(labels) if label != -100)
    start = last_answer
    while start > 0 and labels[start - 1] != -100:  # walk back to the start of the last answer span
        start -= 1
    return ids[:start]
