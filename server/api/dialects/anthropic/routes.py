"""Anthropic's Messages API, for Claude Code and the `anthropic` SDKs: `POST /v1/messages`
and `/v1/messages/count_tokens` (the query string, e.g. `?beta=true`, is ignored).

A thin adapter: the body becomes our one chat request (convert.py), runs on the one
ChatService, and the reply is reshaped into a `Message` or named stream events
(reply.py); errors keep Anthropic's shape (errors.py). A streamed reply sends its
headers at once and `ping` events until it is admitted, also while its model loads,
so clients that give up on a silent connection (Claude Code's, after 300 s) do not.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from sse_starlette import ServerSentEvent

from server.api.deps import ChatDep, KeyDep, ModelsDep, SettingsDep
from server.api.dialects.anthropic.convert import Converted, to_chat
from server.api.dialects.anthropic.errors import anthropic_body
from server.api.dialects.anthropic.reply import Reply
from server.api.errors import validation_error
from server.api.respond import caller_of, until_disconnected
from server.api.sse import sse_response
from server.errors import BadRequestError, HostlerError
from server.protocol.anthropic import CountTokensRequest, MessagesRequest
from server.protocol.chat import ChatCompletionRequest
from server.serving.chat import ChatJob, ChatService
from server.serving.job import Caller
from server.serving.params import MAX_IGNORED_NAMES, header_safe

router = APIRouter()
M = TypeVar("M", bound=BaseModel)


async def parse(request: Request, model: type[M]) -> M:
    """The body as `model`; a 400 in Anthropic's shape for anything unreadable."""
    try:
        data = json.loads(await request.body())
    except (ValueError, RecursionError) as exc:
        raise BadRequestError("the request body is not valid JSON") from exc
    if not isinstance(data, dict):
        raise BadRequestError("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc
    except RecursionError as exc:
        raise BadRequestError("the request body nests too deeply") from exc


def _chat_request(conv: Converted) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate(conv.body)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc


def _ping() -> ServerSentEvent:
    return ServerSentEvent(event="ping", data='{"type":"ping"}')


async def _start(chat: ChatService, conv: Converted, caller: Caller, stream: bool) -> ChatJob:
    job = await chat.start(_chat_request(conv), caller, cap_max_tokens=True, announce=stream)
    if not isinstance(job, ChatJob):  # messages are always there
        job.cancel()
        raise BadRequestError("messages: at least one message is required", param="messages")
    return job


def _headers(job: ChatJob, conv: Converted) -> dict[str, str]:
    names = [*job.ignored, *(header_safe(n) for n in conv.ignored)]
    ignored = list(dict.fromkeys(names))[:MAX_IGNORED_NAMES]
    return {"X-Hostler-Ignored-Params": ",".join(ignored)} if ignored else {}


@router.post("/messages", response_model=None)
async def messages(
    request: Request, chat: ChatDep, models: ModelsDep, settings: SettingsDep, key: KeyDep
) -> Response:
    body = await parse(request, MessagesRequest)
    conv = to_chat(body)
    caller = caller_of(request, key)
    stops = body.stop_sequences or []
    if not body.stream:
        job = await _start(chat, conv, caller, False)
        message = await until_disconnected(request, Reply(job, conv, stops).message())
        if message is None:
            return Response(status_code=499)
        return JSONResponse(message.model_dump(), headers=_headers(job, conv))
    started: list[ChatJob] = []
    headers: dict[str, str] = {}
    if not models.needs_load(body.model):
        # Loaded: everything that can fail does so before the stream, as a real 4xx.
        started.append(await _start(chat, conv, caller, True))
        headers = _headers(started[0], conv)

    async def events() -> AsyncIterator[dict[str, Any]]:
        if not started:  # the model loads first: pings flow meanwhile, errors are events
            try:
                started.append(await _start(chat, conv, caller, True))
            except HostlerError as exc:
                yield anthropic_body(exc)
                return
        async for event in Reply(started[0], conv, stops).events():
            yield event

    def cancel() -> None:
        for job in started:
            job.cancel()

    return sse_response(
        events(),
        keepalive=settings.keepalive,
        grace=settings.shutdown_grace,
        cancel=cancel,
        headers=headers,
        event=lambda data: str(data.get("type", "message")),
        done=False,
        ping=_ping,
        error_body=anthropic_body,
    )


@router.post("/messages/count_tokens")
async def count_tokens(request: Request, chat: ChatDep) -> dict[str, Any]:
    body = await parse(request, CountTokensRequest)
    conv = to_chat(body)
    return {"input_tokens": len(await chat.prompt_tokens(_chat_request(conv)))}
