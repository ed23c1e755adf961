"""Prompts for generation laid out exactly as training rendered them (same template, same tokens)."""

from __future__ import annotations

from typing import Any

from llm_modules.data.prepare import Record, render
from llm_modules.tensors import IGNORE_INDEX

_PLACEHOLDER = "x"


def prompt_ids(messages: list[dict[str, str]], tokenizer: Any, template: str, system: str | None = None) -> list[int]:
    """Token ids that end where the next assistant answer starts.

    `messages` alternate user/assistant and end with a user turn. The conversation is rendered
    with a placeholder answer by the training renderer, then cut before the first token of that
    answer, so the prompt matches training byte for byte (system prompt, turn markers, EOS).
    """
    record = Record(system=system, messages=[*messages, {"role": "assistant", "content": _PLACEHOLDER}])
    ids, labels = render(record, tokenizer, template, "assistant")
    last_answer = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    start = last_answer
    while start > 0 and labels[start - 1] != IGNORE_INDEX:  # walk back to the start of the last answer span
        start -= 1
    return ids[:start]
