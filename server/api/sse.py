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

from server.errors import HostlerError, ServiceUnavailableError

KEEPALIVE_COMMENT = "HOSTLER PROCESSING"
# Time left, at the end of the shutdown grace period, to write the last events.
_FAREWELL_MARGIN = 1.0


EventName = str | Callable[[dict[str, Any]], str] | None


def _name(event: EventName, chunk: dict[str, Any]) -> dict[str, str]:
    if event is None:
        return {}
    return {"event": event if isinstance(event, str) else event(chunk)}


async def _events(
    chunks: AsyncIterator[dict[str, Any]],
    shutdown: anyio.Event,
    grace: float,
    cancel: Callable[[], None],
    event: EventName,
    done: bool,
    error_body: Callable[[HostlerError], dict[str, Any]],
) -> AsyncIterator[dict[str, str]]:
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
            data = json.dumps(chunk, separators=(",", ":"), ensure_ascii=False)
            yield {**_name(event, chunk), "data": data}
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    if cut:
        error = ServiceUnavailableError("the server shut down before this response finished")
        body = error_body(error)
        yield {**_name(event, body), "data": json.dumps(body)}
    if done:
        yield {"data": "[DONE]"}


def sse_response(
    chunks: AsyncIterator[dict[str, Any]],
    *,
    keepalive: float,
    grace: float,
    cancel: Callable[[], None],
    headers: dict[str, str] | None = None,
    event: EventName = None,
    done: bool = True,
    ping: Callable[[], ServerSentEvent] | None = None,
    error_body: Callable[[HostlerError], dict[str, Any]] = HostlerError.to_body,
) -> EventSourceResponse:
    """`event` names every event (KoboldCpp's "message"), or names each by its data
    (Anthropic's); `done` ends with [DONE]; `ping` makes the keep-alive event."""
    shutdown = anyio.Event()
    return EventSourceResponse(
        _events(chunks, shutdown, grace, cancel, event, done, error_body),
        headers=headers,
        ping=keepalive,
        ping_message_factory=ping or (lambda: ServerSentEvent(comment=KEEPALIVE_COMMENT)),
        shutdown_event=shutdown,
        shutdown_grace_period=grace,
    )
