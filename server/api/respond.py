"""Turning a started job into an HTTP response: SSE stream or JSON, with disconnect checks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from server.api.keys import KeyState
from server.api.sse import sse_response
from server.config import Settings
from server.errors import HostlerError
from server.serving.job import Caller

T = TypeVar("T")


class StartedJob(Protocol):
    @property
    def ignored(self) -> list[str]: ...

    def complete(self) -> Awaitable[BaseModel]: ...

    def chunks(self) -> AsyncIterator[dict[str, Any]]: ...

    def cancel(self) -> None: ...


def caller_of(request: Request, key: KeyState) -> Caller:
    """Count the request against its key's rate (429 beyond), and name who sent it:
    the app attribution headers OpenRouter records with each generation."""
    key.admit()
    return Caller(
        referer=request.headers.get("http-referer"),
        title=request.headers.get("x-title"),
        route=request.url.path,
        on_usage=None if key.spec is None else key.add_tokens,
    )


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


async def start_response(
    start: Callable[[], Awaitable[StartedJob]],
    stream: bool,
    request: Request,
    settings: Settings,
    wait_for_load: bool,
) -> Response:
    """Start the job and answer. A streamed request whose model must load first gets its
    stream at once, with `: HOSTLER PROCESSING` comments while the model loads (an error
    found once it has loaded then comes as an error event)."""
    if not (stream and wait_for_load):
        return await job_response(await start(), stream, request, settings)
    started: list[StartedJob] = []

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        try:
            job = await start()
        except HostlerError as exc:
            yield exc.to_body()
            return
        started.append(job)
        async for chunk in job.chunks():
            yield chunk

    def cancel() -> None:
        for job in started:
            job.cancel()

    return sse_response(
        chunks(), keepalive=settings.keepalive, grace=settings.shutdown_grace, cancel=cancel
    )


async def job_response(
    job: StartedJob, stream: bool, request: Request, settings: Settings
) -> Response:
    headers: dict[str, Any] = {}
    if job.ignored:
        headers["X-Hostler-Ignored-Params"] = ",".join(job.ignored)
    if stream:
        return sse_response(
            job.chunks(),
            keepalive=settings.keepalive,
            grace=settings.shutdown_grace,
            cancel=job.cancel,
            headers=headers,
        )
    result = await until_disconnected(request, job.complete())
    if result is None:
        return Response(status_code=499)
    return JSONResponse(result.model_dump(exclude_none=True), headers=headers)
