"""Errors in Anthropic's shape: {"type": "error", "error": {"type", "message"}}.

The same exceptions as everywhere; only the body and a few statuses differ: a full
queue or a model still loading is 529 `overloaded_error` (Claude Code and the SDKs
retry it), and a prompt beyond the context reads as Anthropic's own message.
"""

from __future__ import annotations

from typing import Any

from server.errors import ContextLengthError, HostlerError, QueueFullError, RateLimitError

PATHS = ("/v1/messages", "/api/v1/messages")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def is_anthropic(path: str) -> bool:
    return path.startswith(PATHS)


def anthropic_status(exc: HostlerError) -> int:
    if isinstance(exc, QueueFullError) and not isinstance(exc, RateLimitError):
        return 529
    if exc.status == 503:
        return 529
    if exc.status in _TYPES:
        return exc.status
    return 400 if 400 <= exc.status < 500 else 500


def anthropic_message(exc: HostlerError) -> str:
    if isinstance(exc, ContextLengthError) and exc.tokens is not None and exc.limit is not None:
        # Clients match this text to start compacting (Claude Code among them).
        return f"prompt is too long: {exc.tokens} tokens > {exc.limit} maximum"
    return exc.message


def anthropic_body(exc: HostlerError) -> dict[str, Any]:
    status = anthropic_status(exc)
    return {
        "type": "error",
        "error": {"type": _TYPES.get(status, "api_error"), "message": anthropic_message(exc)},
    }
