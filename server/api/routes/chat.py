"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.api.deps import ChatDep, SettingsDep
from server.api.sse import sse_response
from server.protocol.chat import ChatCompletionRequest

router = APIRouter()
T = TypeVar("T")


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work`; if the client goes away first, cancel it (which frees its slots)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    return None


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, chat: ChatDep, settings: SettingsDep
) -> Response:
    caller = {
        "referer": request.headers.get("http-referer"),
        "title": request.headers.get("x-title"),
    }
    job = await chat.start(body, caller)
    headers: dict[str, Any] = {}
    if job.ignored:
        headers["X-Hostler-Ignored-Params"] = ",".join(job.ignored)
    if body.stream:
        return sse_response(
            job.chunks(),
            keepalive=settings.keepalive,
            grace=settings.shutdown_grace,
            headers=headers,
        )
    result = await until_disconnected(request, job.complete())
    if result is None:
        return Response(status_code=499)
    return JSONResponse(result.model_dump(exclude_none=True), headers=headers)
