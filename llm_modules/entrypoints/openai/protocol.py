"""The OpenAI wire format: request models (pydantic, unknown fields, wrong types and values out of range
refused) and the response and streaming-chunk bodies, plus the OpenAI-style error body."""

from __future__ import annotations

import time
import uuid
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llm_modules.decoding.sampling import (
    MAX_REPETITION_PENALTY,
    MIN_REPETITION_PENALTY,
    MIN_TEMPERATURE,
)

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # each; the text streamed back is held against every stop string at every token


class _Strict(BaseModel):
    # strict: "5" is not an integer and 1 is not a string; extra="forbid": an unknown field is an error
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    """A text part of a message's content given as a list of parts."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One message; "developer" is the newer name of "system"."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    """include_usage: one more chunk before [DONE], with no choices and the usage."""

    include_usage: bool = False


class SamplingRequest(_Strict):
    """The fields /v1/chat/completions and /v1/completions share. temperature 0 decodes greedily; a
    sampling one must be at least MIN_TEMPERATURE; a seed must fit torch's generator (64 bits);
    repetition_penalty (vLLM's extension) lies between MIN_ and MAX_REPETITION_PENALTY."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**64 - 1)
    # vLLM's extension (not OpenAI's): > 1 discourages repeating the text so far; bounded as SamplingOptions does
    repetition_penalty: float | None = Field(None, allow_inf_nan=False)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request
    user: str | None = None

    @field_validator("temperature")
    @classmethod
    def _temperature_floor(cls, value: float | None) -> float | None:
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {value!r}")
        return value

    @field_validator("repetition_penalty")
    @classmethod
    def _repetition_penalty_bounds(cls, value: float | None) -> float | None:
        if value is not None and not MIN_REPETITION_PENALTY <= value <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be between {MIN_REPETITION_PENALTY} and "
                             f"{MAX_REPETITION_PENALTY:g} (1: none), got {value!r}")
        return value

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string may hold at most {MAX_STOP_CHARS} characters")
        return value

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def new_tokens(self) -> int | None:
        return self.max_tokens

    def texts(self) -> Iterator[tuple[str, str]]:
        """(field, text) for every string of the request."""
        for name in ("model", "user"):
            if getattr(self, name) is not None:
                yield name, getattr(self, name)
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        yield from ((f"stop.{i}" if isinstance(self.stop, list) else "stop", s) for i, s in enumerate(stops))

    def not_unicode(self) -> str | None:
        """The first field holding a lone surrogate (JSON's "\\ud800": no Unicode text, no tokens), or None."""
        for name, text in self.texts():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                return name
        return None


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer clients' name for max_tokens

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def texts(self) -> Iterator[tuple[str, str]]:
        yield from super().texts()
        for i, message in enumerate(self.messages):
            if message.name is not None:
                yield f"messages.{i}.name", message.name
            if isinstance(message.content, str):
                yield f"messages.{i}.content", message.content
            else:
                yield from ((f"messages.{i}.content.{j}.text", p.text) for j, p in enumerate(message.content))


class CompletionRequest(SamplingRequest):
    """POST /v1/completions (one prompt string)."""

    prompt: str = Field(min_length=1)

    def texts(self) -> Iterator[tuple[str, str]]:
        yield from super().texts()
        yield "prompt", self.prompt


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Reply:
    """The ids, timestamps and body shapes of one response (chat or text completion)."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, text: str, finish_reason: str, counts: dict[str, int]) -> dict[str, Any]:
        """The non-streamed response."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            return {**self._envelope("chat.completion", [choice]), "usage": counts}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._envelope("text_completion", [choice]), "usage": counts}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
        """One streamed piece: a chat delta (the first also carries the role) or a piece of text."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, counts: dict[str, int]) -> dict[str, Any]:
        """The extra last chunk of `stream_options.include_usage`: no choices, the usage."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(kind, []), "usage": counts}
