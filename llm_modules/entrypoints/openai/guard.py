"""What every request passes before a route sees it (one ASGI middleware, outermost in the app):

1. the Host header, when the server listens on a loopback address: only that address or `localhost`
   (a web page whose name was rebound to 127.0.0.1 must not reach the API: DNS rebinding);
2. the API key, when the server has one: every `/v1/*` request needs `Authorization: Bearer KEY`
   (compared in constant time); `/health` and the page stay open;
3. the body size: at most `max_body` bytes (413), refused from Content-Length before reading, else
   while reading; the body is then handed to the app from memory;
4. an exception no handler caught: an OpenAI-style 500 without its text, which goes to the log.
Every refusal is an OpenAI-style error body.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from typing import Any, Awaitable, Callable

from llm_modules.entrypoints.openai.protocol import error_body

logger = logging.getLogger("llm_modules.serve")

DEFAULT_MAX_REQUEST_BYTES = 1 << 20  # 1 MiB: far more text than any served model's context holds
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """A Host header's name without its port: "[::1]:8000" -> "::1", "Localhost:80" -> "localhost"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """The checks above around an ASGI app. `bind_host`: the address the server listens on (the Host
    check applies when it is a loopback one); `api_key`: None for an open API."""

    def __init__(self, app: Any, bind_host: str = "127.0.0.1", api_key: str | None = None,
                 max_body: int = DEFAULT_MAX_REQUEST_BYTES):
        self.app, self.max_body = app, max_body
        self.key = api_key.encode() if api_key else None
        self.hosts = {host_name(bind_host), *LOOPBACK_NAMES} if is_loopback(host_name(bind_host)) else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        host = headers.get("host")
        if self.hosts is not None and host is not None and host_name(host.decode("latin-1")) not in self.hosts:
            return await refuse(send, 400, f"the Host header {host.decode('latin-1')!r} is not this server's address "
                                           "(it listens on a loopback address; use localhost or the address itself)",
                                code="invalid_host")
        path = scope.get("path", "")
        if self.key is not None and (path == "/v1" or path.startswith("/v1/")) and not self._authorized(headers):
            return await refuse(send, 401, "missing or incorrect API key: send the header 'Authorization: Bearer "
                                           "<key>' with the key the server was started with", code="invalid_api_key",
                                extra=[(b"www-authenticate", b"Bearer")])
        length = headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_body:
            return await self.too_large(send)
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            body = await self._read(receive)
            if body is None:
                return await self.too_large(send)
            receive = replay(body, receive)
        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            logger.exception("%s %s failed", scope.get("method"), path)  # the text goes here, not to the client
            if not started:
                await refuse(send, 500, "the server failed on this request; its log has the details", "server_error")

    def _authorized(self, headers: dict[str, bytes]) -> bool:
        scheme, _, token = headers.get("authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it passes max_body."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: the app sees an empty body
                return b"".join(chunks)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def too_large(self, send: Send) -> None:
        await refuse(send, 413, f"the request body is larger than {self.max_body} bytes (the server's "
                                "--max-request-bytes)", code="request_too_large")


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that gives `body` once, then waits on the client (for its disconnect)."""
    sent = False

    async def replayed() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def refuse(send: Send, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 extra: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = json.dumps(error_body(message, kind, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *(extra or [])]})
    await send({"type": "http.response.body", "body": payload})
