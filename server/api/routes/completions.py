"""POST /v1/completions (text completion: a raw prompt, no template)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.api.deps import CompletionsDep, KeyDep, SettingsDep
from server.api.respond import caller_of, job_response
from server.protocol.completions import CompletionRequest

router = APIRouter()


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest,
    request: Request,
    service: CompletionsDep,
    settings: SettingsDep,
    key: KeyDep,
) -> Response:
    job = await service.start(body, caller_of(request, key))
    return await job_response(job, body.stream, request, settings)
