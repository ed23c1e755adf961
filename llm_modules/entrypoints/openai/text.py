"""From requests to token ids and from token ids back to text: the chat prompt laid out as the model
was trained (the template `data.prompting.choose_template` picks), and the generated text released
piece by piece, never part of a stop string or half a character."""

from __future__ import annotations

from typing import Any

from llm_modules.data.prompting import prompt_ids
from llm_modules.errors import LLMModulesError


class PromptFormat:
    """Renders a chat (a system message first, if any, then user/assistant turns ending with the user)."""

    def __init__(self, tokenizer: Any, template: str):
        self.tokenizer, self.template = tokenizer, template

    def chat(self, messages: list[tuple[str, str]]) -> list[int]:
        """messages: (role, text) pairs -> prompt ids ending where the assistant's answer starts."""
        system = None
        if messages and messages[0][0] in ("system", "developer"):
            system, messages = messages[0][1], messages[1:]
        for i, (role, _) in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                raise LLMModulesError(
                    f"messages[{i + (system is not None)}]: expected a '{expected}' message, got '{role}' (after an "
                    f"optional system message first, turns alternate user/assistant and end with the user)")
        if not messages or messages[-1][0] != "user":
            raise LLMModulesError("messages: the last message must be from the user")
        return prompt_ids([{"role": r, "content": t} for r, t in messages], self.tokenizer, self.template, system)

    def completion(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])


class TextDeltas:
    """Decodes the tokens generated so far and says which new text is safe to send.

    Text is held back while it ends in an incomplete character (U+FFFD from a partial byte
    sequence) or in what could be the start of a stop string; at the first stop string the text is
    cut before it and `stopped` is set. The sent pieces concatenate to the final text.
    """

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.sent = ""
        self.stopped = False

    def update(self, tokens: list[int], final: bool) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cuts = [text.find(s) for s in self.stops if s in text]
        if cuts:
            text, final, self.stopped = text[: min(cuts)], True, True
        end = len(text) if final else self._safe_end(text)
        if end <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) : end], text[:end]
        return delta

    def _safe_end(self, text: str) -> int:
        end = len(text.rstrip("\ufffd"))
        for k in range(min(end, max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(text[end - k : end]) for s in self.stops):
                return end - k
        return end
