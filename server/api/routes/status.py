"""The status page: `GET /` for a browser, its static files, and its data feed.

- `GET /` answers a browser (Accept: text/html) with the page and every other client
  with the JSON it always had. The page and its files are open, like `/`: they hold no
  data. Everything the page shows comes from `GET /status` (one snapshot) or
  `GET /status/events` (the same snapshot a few times a second, as server-sent events),
  which need the API key when one is set, like the rest of the API.
- The feed is bounded: at most `StatusBoard.max_feeds` open at once (429 beyond), each
  closed when its page goes; snapshots are built once per interval for all of them.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import AsyncIterator
from functools import cache
from importlib import resources
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from server import __version__
from server.api.deps import require_key
from server.errors import NotFoundError
from server.serving.status import StatusBoard

# The page's own files, by name: nothing else is served from the folder.
_FILES = {
    "status.css": "text/css; charset=utf-8",
    "status.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# Scripts, styles and connections from this server only; no frames, no plugins.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)
"""Open: the page and its files."""
data = APIRouter(dependencies=[Depends(require_key)], include_in_schema=False)
"""Behind the key: what the page shows."""


@cache
def _static(name: str) -> bytes:
    return resources.files("server.api").joinpath("static", name).read_bytes()


def wants_html(request: Request) -> bool:
    """A browser navigating here: it asks for text/html before JSON (curl and SDKs send
    */* or application/json)."""
    accept = request.headers.get("accept", "").lower()
    return "text/html" in accept


@router.head("/")  # Claude Code's connectivity check
@router.get("/")
async def root(request: Request) -> Response:
    """The status page for a browser; what this is, as JSON, for everyone else."""
    if wants_html(request):
        return Response(_static("status.html"), media_type="text/html", headers=_PAGE_HEADERS)
    return JSONResponse(
        {
            "name": "hostler",
            "version": __version__,
            "api": {"openai": "/v1", "openrouter": "/api/v1", "anthropic": "/v1/messages"},
            "models": "/v1/models",
            "health": "/health",
            "status": "/status",
            "docs": "/docs",
        }
    )


@router.get("/ui/{name}")
async def static_file(name: str) -> Response:
    media_type = _FILES.get(name)
    if media_type is None:
        raise NotFoundError(f"no such file: /ui/{name}")
    return Response(_static(name), media_type=media_type, headers=_PAGE_HEADERS)


def _board(request: Request) -> StatusBoard:
    board: StatusBoard = request.app.state.status
    return board


@data.get("/status")
async def status(request: Request) -> JSONResponse:
    """Everything the page shows, once (for polling, scripts and tests)."""
    return JSONResponse(_board(request).latest(), headers={"Cache-Control": "no-store"})


@data.get("/status/events")
async def events(request: Request) -> EventSourceResponse:
    """The snapshot as an `event: status` every interval, until the page goes."""
    board = _board(request)
    token = board.open_feed()  # 429 beyond the bound, before anything streams
    shutdown = anyio.Event()
    stream = _feed(board, shutdown, token)
    # However the response ends (page closed, server stopping), its place is given back.
    weakref.finalize(stream, board.close_feed, token)
    return EventSourceResponse(
        stream,
        ping=15,
        ping_message_factory=lambda: ServerSentEvent(comment="ping"),
        shutdown_event=shutdown,
        shutdown_grace_period=0.5,
        headers={"Cache-Control": "no-store"},
    )


async def _feed(
    board: StatusBoard, shutdown: anyio.Event, token: object
) -> AsyncIterator[dict[str, Any]]:
    try:
        while not shutdown.is_set():
            body = json.dumps(board.latest(), separators=(",", ":"))
            yield {"event": "status", "data": body}
            with anyio.move_on_after(board.interval):
                await shutdown.wait()
    finally:
        board.close_feed(token)
