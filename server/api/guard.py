"""The first thing every request meets: Host and Origin checks, drain, body size.

A pure ASGI middleware, so that a refused request costs no parsing at all:
- `Host` must be an allowed name (a web page that rebinds its DNS name to 127.0.0.1
  sends its own name here, and is refused);
- a browser's `Origin` must be a configured CORS origin, or the server itself;
- while the server drains for shutdown, new requests get 503;
- a body over the limit gets 413 before any of it is parsed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.dialects.anthropic.errors import anthropic_body, anthropic_status, is_anthropic
from server.errors import (
    BadRequestError,
    ForbiddenError,
    HostlerError,
    PayloadTooLargeError,
    ServiceUnavailableError,
)

OLLAMA_PREFIX = "/api/"


def is_ollama(path: str) -> bool:
    """Ollama's routes (/api/chat, /api/embed, ...), not OpenRouter's /api/v1 nor
    KoboldCpp's /api/extra: their errors are Ollama's `{"error": "message"}`."""
    return path.startswith(OLLAMA_PREFIX) and not path.startswith(("/api/v1/", "/api/extra/"))


def host_name(value: str) -> str:
    """`Host` header value without its port, lower-cased ('[::1]:8000' -> '[::1]')."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        hosts: list[str] | None,
        origins: list[str],
        max_body: int,
        draining: Callable[[], bool],
    ) -> None:
        self.app = app
        self.hosts = None if hosts is None else {host_name(h) for h in hosts}
        self.any_origin = "*" in origins
        self.origins = {o.rstrip("/").lower() for o in origins}
        self.max_body = max_body
        self.draining = draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        path: str = scope["path"]
        problem = self._check(scope, headers)
        if problem is not None:
            await _send_error(send, problem, path)
            return
        if path.startswith(OLLAMA_PREFIX) and not path.startswith("/api/v1/"):
            # Ollama reads every body as JSON, whatever its Content-Type; its clients
            # (and `curl -d`) rely on it. Cross-site pages were refused above by Origin.
            raw = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*raw, (b"content-type", b"application/json")]}
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                await _send_error(send, BadRequestError("invalid Content-Length"), path)
                return
            if int(length) > self.max_body:
                await _send_error(send, self._too_large(), path)
                return
            await self.app(scope, receive, send)
            return
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        # Chunked upload: read it here, up to the limit, then hand it on.
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                await _send_error(send, self._too_large(), path)
                return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _check(self, scope: Scope, headers: dict[str, str]) -> HostlerError | None:
        host = host_name(headers.get("host", ""))
        if self.hosts is not None and host not in self.hosts:
            return BadRequestError(
                "this Host is not allowed; add it to the allowed_hosts setting", param="Host"
            )
        origin = headers.get("origin")
        # A page from elsewhere is allowed only on the server's own origin.
        if (
            origin
            and not self.any_origin
            and origin.rstrip("/").lower() not in self.origins
            and urlsplit(origin).netloc.lower() != headers.get("host", "").lower()
        ):
            return ForbiddenError(
                "this Origin is not allowed; add it to the cors_origins setting",
                param="Origin",
            )
        if self.draining() and scope["path"] != "/health":
            return ServiceUnavailableError(
                "the server is shutting down", headers={"Retry-After": "5"}
            )
        return None

    def _too_large(self) -> HostlerError:
        return PayloadTooLargeError(
            f"the request body is larger than {self.max_body // 2**20} MiB (setting max_body_mb)"
        )


async def _send_error(send: Send, exc: HostlerError, path: str = "") -> None:
    status = exc.status
    if is_anthropic(path):
        body = json.dumps(anthropic_body(exc)).encode()
        status = anthropic_status(exc)
    elif is_ollama(path):
        body = json.dumps({"error": exc.message}).encode()
    else:
        body = json.dumps(exc.to_body()).encode()
    headers: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    start: dict[str, Any] = {"type": "http.response.start", "status": status}
    start["headers"] = headers
    await send(start)
    await send({"type": "http.response.body", "body": body})
