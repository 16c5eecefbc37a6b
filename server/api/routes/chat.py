"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.api.deps import ChatDep, KeyDep, ModelsDep, SettingsDep
from server.api.respond import caller_of, start_response
from server.protocol.chat import ChatCompletionRequest

router = APIRouter()


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    chat: ChatDep,
    settings: SettingsDep,
    key: KeyDep,
    models: ModelsDep,
) -> Response:
    caller = caller_of(request, key)
    return await start_response(
        lambda: chat.start(body, caller),
        body.stream,
        request,
        settings,
        wait_for_load=models.needs_load(body.model),
    )
