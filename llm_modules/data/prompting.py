"""Prompts for generation laid out exactly as training rendered them (same template, same tokens), and
which template a model's prompts take."""

from __future__ import annotations

from typing import Any

from llm_modules.data.prepare import render
from llm_modules.data.sources import Record
from llm_modules.models.saved import run_defaults
from llm_modules.tensors import IGNORE_INDEX

_PLACEHOLDER = "x"


def choose_template(model_dir: str, tokenizer: Any, template: str | None = None, fallback: str = "stratos") -> str:
    """The prompt template of a model (`generate`, `chat` and the server all ask here): `template` when
    given (other than "auto"); else the one its training run rendered with; else "chat" when the
    tokenizer has a chat template; else `fallback` ("stratos"; `generate` passes "raw", plain text)."""
    if template and template != "auto":
        return template
    return run_defaults(model_dir).get("template") or (
        "chat" if getattr(tokenizer, "chat_template", None) else fallback)


def prompt_ids(messages: list[dict[str, str]], tokenizer: Any, template: str, system: str | None = None) -> list[int]:
    """Token ids that end where the next assistant answer starts.

    `messages` alternate user/assistant and end with a user turn. The conversation is rendered
    with a placeholder answer by the training renderer, then cut before the first token of that
    answer, so the prompt matches training byte for byte (system prompt, turn markers, EOS). A chat
    template is rendered twice however long the conversation (`render`'s one_render).
    """
    record = Record(system=system, messages=[*messages, {"role": "assistant", "content": _PLACEHOLDER}])
    ids, labels = render(record, tokenizer, template, "assistant", one_render=True)
    last_answer = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    start = last_answer
    while start > 0 and labels[start - 1] != IGNORE_INDEX:  # walk back to the start of the last answer span
        start -= 1
    return ids[:start]
