"""Server-sent events: `data:` lines, keep-alive comments, `[DONE]` at the end.

On shutdown a stream may finish within the grace period; one still running when the
period is nearly over is cancelled in the engine and ends with an error event and
`[DONE]`, so no client is left with a cut connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from sse_starlette import EventSourceResponse, ServerSentEvent

from server.errors import ServiceUnavailableError

KEEPALIVE_COMMENT = "HOSTLER PROCESSING"
# Time left, at the end of the shutdown grace period, to write the last events.
_FAREWELL_MARGIN = 1.0


async def _events(
    chunks: AsyncIterator[dict[str, Any]],
    shutdown: anyio.Event,
    grace: float,
    cancel: Callable[[], None],
    event: str | None,
    done: bool,
) -> AsyncIterator[dict[str, str]]:
    named = {"event": event} if event else {}
    cut = False

    async def cut_at_deadline() -> None:
        nonlocal cut
        await shutdown.wait()
        await asyncio.sleep(max(grace - _FAREWELL_MARGIN, 0.0))
        cut = True
        cancel()  # the engine ends the job; its outputs end `chunks` below

    watcher = asyncio.ensure_future(cut_at_deadline())
    try:
        async for chunk in chunks:
            yield {**named, "data": json.dumps(chunk, separators=(",", ":"), ensure_ascii=False)}
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    if cut:
        error = ServiceUnavailableError("the server shut down before this response finished")
        yield {**named, "data": json.dumps(error.to_body())}
    if done:
        yield {"data": "[DONE]"}


def sse_response(
    chunks: AsyncIterator[dict[str, Any]],
    *,
    keepalive: float,
    grace: float,
    cancel: Callable[[], None],
    headers: dict[str, str] | None = None,
    event: str | None = None,
    done: bool = True,
) -> EventSourceResponse:
    """`event` names every event (KoboldCpp's "message"); `done` ends with [DONE]."""
    shutdown = anyio.Event()
    return EventSourceResponse(
        _events(chunks, shutdown, grace, cancel, event, done),
        headers=headers,
        ping=keepalive,
        ping_message_factory=lambda: ServerSentEvent(comment=KEEPALIVE_COMMENT),
        shutdown_event=shutdown,
        shutdown_grace_period=grace,
    )
