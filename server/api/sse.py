"""Server-sent events: `data:` lines, keep-alive comments, `[DONE]` at the end."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent

KEEPALIVE_COMMENT = "HOSTLER PROCESSING"


async def _events(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, str]]:
    async for chunk in chunks:
        yield {"data": json.dumps(chunk, separators=(",", ":"), ensure_ascii=False)}
    yield {"data": "[DONE]"}


def sse_response(
    chunks: AsyncIterator[dict[str, Any]],
    *,
    keepalive: float,
    grace: float,
    headers: dict[str, str] | None = None,
) -> EventSourceResponse:
    return EventSourceResponse(
        _events(chunks),
        headers=headers,
        ping=keepalive,
        ping_message_factory=lambda: ServerSentEvent(comment=KEEPALIVE_COMMENT),
        shutdown_grace_period=grace,
    )
