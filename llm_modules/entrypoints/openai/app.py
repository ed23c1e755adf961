"""The HTTP side: FastAPI routes with the OpenAI shapes over an `Engine`.

Handlers stay thin: the body is validated by the wire models (`protocol`), the prompt rendered
(`text`, on a worker thread: the event loop never tokenizes), a Sequence handed to the engine, and
its tokens relayed, whole or as server-sent events. A client that goes away cancels its row. Every
refusal is an OpenAI-style error body: 400 for bad input, 401 without the API key, 404 for an
unknown model or route, 413 for a body over the limit, 429 when the engine's queue is full, 500
(no details; they go to the log) when something fails on the server. `guard` checks the Host
header, the key and the body size before any route.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from llm_modules.decoding.engine import Engine, EngineFull, Sequence
from llm_modules.decoding.limits import describe_limit, model_positions, new_token_room
from llm_modules.decoding.sampling import SamplingOptions
from llm_modules.entrypoints.openai.guard import DEFAULT_MAX_REQUEST_BYTES, Guard
from llm_modules.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Reply,
    SamplingRequest,
    error_body,
    usage,
)
from llm_modules.entrypoints.openai.text import PromptFormat, TextDeltas
from llm_modules.errors import LLMModulesError

DISCONNECT_CHECK_S = 0.5  # how often a waiting handler asks whether its client is still there
logger = logging.getLogger("llm_modules.serve")


@dataclass
class Served:
    """What the server serves: the engine, the model's name in the API, how prompts are rendered, and
    who may ask: `host` the address it listens on (loopback: Host headers are checked), `api_key`
    (None: an open API), `max_request_bytes` the largest body."""

    engine: Engine
    name: str
    prompts: PromptFormat
    default_max_tokens: int = 256
    host: str = "127.0.0.1"
    api_key: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES


class ApiError(Exception):
    """A refusal with its HTTP status and OpenAI-style error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, kind, param, code)


def validation_message(error: dict[str, Any]) -> tuple[str, str | None]:
    """A pydantic error of the request body -> (one sentence naming what and where, the field)."""
    loc = [str(p) for p in error.get("loc", ()) if p != "body"]
    kind = error.get("type", "")
    if kind == "json_invalid":
        where = f" at character {loc[0]}" if loc else ""
        return f"malformed JSON in the request body{where}: {error.get('ctx', {}).get('error', error['msg'])}", None
    field = ".".join(loc) or None
    if field is None:
        return f"the request body must be a JSON object ({error['msg']})", None
    if kind == "extra_forbidden":
        return f"unknown field '{field}' in the request body", field
    if kind == "missing":
        return f"missing required field '{field}'", field
    if field == "messages" and kind == "too_short":
        return "messages must hold at least one message", field
    if kind == "string_unicode":  # pydantic's own check of a constrained string
        return lone_surrogate(field), field
    if kind == "value_error":  # our own validators: the message says it all
        return f"field '{field}': {error.get('ctx', {}).get('error', error['msg'])}", field
    got = repr(error.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."  # never echo a whole prompt back
    return f"field '{field}': {error['msg']} (got {got})", field


def page() -> str:
    return (resources.files(__package__) / "static" / "chat.html").read_text(encoding="utf-8")


def create_app(served: Served) -> FastAPI:
    engine = served.engine

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="llm-modules", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served
    app.add_middleware(Guard, bind_host=served.host, api_key=served.api_key, max_body=served.max_request_bytes)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return JSONResponse(err.body, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        message, field = validation_message(err.errors()[0])
        return JSONResponse(error_body(message, param=field), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        return JSONResponse(error_body(str(err.detail), "not_found_error" if err.status_code == 404 else
                                       "invalid_request_error"), status_code=err.status_code)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return page()

    @app.get("/health")
    async def health():
        stats = engine.stats
        return {"status": "ok", "model": served.name, "running": stats.running, "queued": stats.queued,
                "max_batch": stats.max_batch, "max_queue": stats.max_queue, "finished": stats.finished,
                "generated_tokens": stats.generated_tokens, "failed": stats.failed,
                "auth": served.api_key is not None}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "llm-modules"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check(served, body)
        limit = engine.max_positions
        if limit is not None and len(body.messages) > limit:  # each message renders to a token at least
            raise ApiError(400, f"{len(body.messages)} messages cannot fit in {limit_text(served)}",
                           param="messages")
        try:  # on a worker thread: a long conversation must not hold the event loop
            prompt = await run_in_threadpool(served.prompts.chat, [(m.role, m.text()) for m in body.messages])
        except LLMModulesError as err:
            raise ApiError(400, str(err), param="messages") from None
        return await respond(served, Reply(True, served.name), body, prompt, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check(served, body)
        prompt = await run_in_threadpool(served.prompts.completion, body.prompt)
        return await respond(served, Reply(False, served.name), body, prompt, request)

    return app


def check(served: Served, body: SamplingRequest) -> None:
    """What is refused before any work: another model's name, text that is not Unicode."""
    if body.model is not None and body.model != served.name:
        raise ApiError(404, f"model '{body.model}' is not served here; this server serves '{served.name}'",
                       "not_found_error", "model", "model_not_found")
    field = body.not_unicode()
    if field is not None:
        raise ApiError(400, lone_surrogate(field), param=field)


def lone_surrogate(field: str) -> str:
    return (f"field '{field}' holds a lone surrogate (a \\ud800-\\udfff escape without its pair), which is not "
            "Unicode text")


def sampling_options(served: Served, body: SamplingRequest, prompt: list[int]) -> SamplingOptions:
    """Request fields -> engine options; temperature 0 is greedy, and OpenAI's default is 1 (sampling)."""
    limit = served.engine.max_positions
    room = new_token_room(len(prompt), limit)
    if room is not None and room < 1:
        raise ApiError(400, f"the prompt ({len(prompt)} tokens) fills {limit_text(served)}; shorten it",
                       param="messages" if isinstance(body, ChatCompletionRequest) else "prompt")
    new_tokens = body.new_tokens()
    if new_tokens is None:
        new_tokens = min(served.default_max_tokens, room or served.default_max_tokens)
    elif room is not None and new_tokens > room:
        field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        raise ApiError(400, f"{field}={new_tokens} with the prompt's {len(prompt)} tokens exceeds "
                            f"{limit_text(served)}; ask for at most {room}", param=field)
    temperature = 1.0 if body.temperature is None else body.temperature
    return SamplingOptions(max_new_tokens=new_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
                           top_p=1.0 if body.top_p is None else body.top_p, stop_strings=body.stop_strings() or None,
                           seed=body.seed,
                           repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty)


def limit_text(served: Served) -> str:
    """The positions a request may fill, said as the model's limit less what speculative decoding reserves."""
    return describe_limit(served.engine.max_positions, model_positions(served.engine.model))


async def respond(served: Served, reply: Reply, body: SamplingRequest, prompt: list[int], request: Request):
    loop, updates = asyncio.get_running_loop(), asyncio.Queue()
    try:
        seq = served.engine.sequence(prompt, sampling_options(served, body, prompt),
                                     on_update=lambda s: loop.call_soon_threadsafe(updates.put_nowait, None),
                                     request_id=reply.id)
    except LLMModulesError as err:
        raise ApiError(400, str(err)) from None
    try:
        served.engine.submit(seq)
    except EngineFull as err:
        raise ApiError(429, str(err), "rate_limit_error", code="queue_full") from None
    deltas = TextDeltas(served.engine.tokenizer, body.stop_strings())
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(stream(reply, seq, deltas, updates, request, len(prompt), include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    async with aclosing(follow(seq, updates, request)) as steps:
        async for _ in steps:  # the engine ends the row at a stop string: no text needed meanwhile
            pass
    if seq.finish_reason == "cancelled":  # the client is gone
        return JSONResponse(error_body("the client closed the request"), status_code=499)
    text = deltas.update(list(seq.tokens), final=True)
    reason = finish_reason(seq, deltas)
    if reason == "error":
        raise ApiError(500, decoding_failed(seq), "server_error")
    return reply.whole(text, reason, usage(len(prompt), len(seq.tokens)))


def decoding_failed(seq: Sequence) -> str:
    """What the client learns of a failed row: its request id; the error itself is in the server's log."""
    return f"decoding failed for request {seq.request_id}; the server's log has the details"


def finish_reason(seq: Sequence, deltas: TextDeltas) -> str:
    """OpenAI's: "stop" (EOS or a stop string) or "length"; "error" when decoding failed."""
    return "stop" if deltas.stopped else (seq.finish_reason or "stop")


async def follow(seq: Sequence, updates: asyncio.Queue, request: Request) -> AsyncIterator[None]:
    """Yields after each batch of new tokens until `seq` ends; a client that went away cancels it
    (checked every DISCONNECT_CHECK_S), and so does leaving early (a stop string found here)."""
    checked = time.monotonic()
    try:
        while not seq.finished:
            try:
                await asyncio.wait_for(updates.get(), timeout=DISCONNECT_CHECK_S)
            except asyncio.TimeoutError:
                pass
            while not updates.empty():
                updates.get_nowait()
            if time.monotonic() - checked >= DISCONNECT_CHECK_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
            yield
    finally:
        if not seq.finished:
            seq.cancel()


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def stream(reply: Reply, seq: Sequence, deltas: TextDeltas, updates: asyncio.Queue, request: Request,
                 prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: the role (chat), text deltas, a last chunk with the finish reason, [DONE].
    A failure (the row's, or here) sends an error event without details (they go to the log), then [DONE]."""
    try:
        if reply.chat:
            yield sse(reply.chunk("", first=True))
        async with aclosing(follow(seq, updates, request)) as steps:
            async for _ in steps:
                piece = deltas.update(list(seq.tokens), final=seq.finished)
                if piece:
                    yield sse(reply.chunk(piece))
                if deltas.stopped:
                    break
    except Exception:
        logger.exception("streaming request %s failed", reply.id)
        seq.cancel()
        yield sse(error_body(f"streaming failed for request {reply.id}; the server's log has the details",
                             "server_error"))
        yield "data: [DONE]\n\n"
        return
    reason = finish_reason(seq, deltas)
    if reason == "cancelled":  # the client is gone
        return
    if reason == "error":
        yield sse(error_body(decoding_failed(seq), "server_error"))
    else:
        rest = deltas.update(list(seq.tokens), final=True)
        if rest:
            yield sse(reply.chunk(rest))
        yield sse(reply.chunk(None, reason))
        if include_usage:
            yield sse(reply.usage_chunk(usage(prompt_tokens, len(seq.tokens))))
    yield "data: [DONE]\n\n"
