"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.api.deps import ChatDep, KeyDep, SettingsDep
from server.api.respond import caller_of, job_response
from server.protocol.chat import ChatCompletionRequest

router = APIRouter()


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    chat: ChatDep,
    settings: SettingsDep,
    key: KeyDep,
) -> Response:
    job = await chat.start(body, caller_of(request, key))
    return await job_response(job, body.stream, request, settings)
