"""POST /v1/completions (text completion: a raw prompt, no template)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.api.deps import CompletionsDep, KeyDep, ModelsDep, SettingsDep
from server.api.respond import caller_of, start_response
from server.protocol.completions import CompletionRequest

router = APIRouter()


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest,
    request: Request,
    service: CompletionsDep,
    settings: SettingsDep,
    key: KeyDep,
    models: ModelsDep,
) -> Response:
    caller = caller_of(request, key)
    return await start_response(
        lambda: service.start(body, caller),
        body.stream,
        request,
        settings,
        wait_for_load=models.needs_load(body.model),
    )
