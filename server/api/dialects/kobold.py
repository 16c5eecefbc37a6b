"""KoboldCpp's API, for frontends set to KoboldCpp (SillyTavern, KoboldAI Lite, Agnaistic):
info routes, token count, `POST /api/v1/generate`, `/api/extra/generate/stream`,
`/api/extra/abort` and `/api/extra/embeddings`. Generation is a text completion on the
one CompletionService; Kobold's sampler names (`rep_pen`, `max_length`, integer
`sampler_order`, ...) are read by protocol/aliases.py.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server import __version__
from server.api.deps import CompletionsDep, EmbeddingsDep, KeyDep, ModelsDep, SettingsDep
from server.api.dialects.tokens import encode
from server.api.keys import KeyState
from server.api.respond import caller_of, until_disconnected
from server.api.routes.embeddings import embed, json_response, openai_list
from server.api.sse import sse_response
from server.protocol.completions import Completion, CompletionRequest, completion_from
from server.protocol.embeddings import KoboldEmbeddingRequest
from server.protocol.textgen import KoboldAbort, KoboldGenerateRequest, KoboldPrompt
from server.serving.completions import CompletionJob, CompletionService

router = APIRouter()

# The KoboldCpp release whose API this mirrors (clients gate features on it).
KOBOLD_VERSION = "1.98.0"


def _running(request: Request) -> weakref.WeakValueDictionary[str, CompletionJob]:
    """This app's running Kobold generations by API key and genkey (for abort): a
    caller can only abort its own key's generations, however guessable genkeys are."""
    state = request.app.state
    if not hasattr(state, "kobold_jobs"):
        state.kobold_jobs = weakref.WeakValueDictionary()
    jobs: weakref.WeakValueDictionary[str, CompletionJob] = state.kobold_jobs
    return jobs


def _as_completion(body: KoboldGenerateRequest) -> CompletionRequest:
    return completion_from(body, {"genkey"}, prompt=body.prompt)


@router.get("/api/v1/model")
async def model(models: ModelsDep) -> dict[str, Any]:
    return {"result": f"koboldcpp/{(await models.get(None)).spec.id}"}


@router.get("/api/v1/info/version")
async def api_version() -> dict[str, Any]:
    return {"result": "1.2.5"}


@router.get("/api/extra/version")
async def version() -> dict[str, Any]:
    return {"result": "KoboldCpp", "version": KOBOLD_VERSION, "server": f"hostler {__version__}"}


@router.get("/api/extra/true_max_context_length")
@router.get("/api/v1/config/max_context_length")
async def max_context(models: ModelsDep) -> dict[str, Any]:
    return {"value": (await models.get(None)).engine.info.n_ctx}


@router.get("/api/v1/config/max_length")
async def max_length(models: ModelsDep) -> dict[str, Any]:
    served = await models.get(None)
    return {"value": served.spec.defaults.max_tokens or 512}


@router.post("/api/extra/tokencount")
async def token_count(body: KoboldPrompt, models: ModelsDep) -> dict[str, Any]:
    ids = await encode(models, body.prompt, None)
    return {"value": len(ids), "ids": ids}


@router.post("/api/extra/abort")
async def abort(body: KoboldAbort, request: Request, key: KeyDep) -> dict[str, Any]:
    """End the generation started with this genkey (a client that disconnects is
    cancelled anyway; without a genkey nothing is aborted: the server is shared)."""
    job = _running(request).get(f"{id(key)}:{body.genkey}") if body.genkey else None
    if job is not None:
        job.cancel()
    return {"success": job is not None}


async def _start(
    body: KoboldGenerateRequest, request: Request, service: CompletionService, key: KeyState
) -> CompletionJob:
    job = await service.start(_as_completion(body), caller_of(request, key))
    if body.genkey:
        _running(request)[f"{id(key)}:{body.genkey}"] = job
    return job


def _headers(job: CompletionJob) -> dict[str, str] | None:
    return {"X-Hostler-Ignored-Params": ",".join(job.ignored)} if job.ignored else None


@router.post("/api/v1/generate", response_model=None)
async def generate(
    body: KoboldGenerateRequest, request: Request, service: CompletionsDep, key: KeyDep
) -> Response:
    job = await _start(body, request, service, key)
    result: Completion | None = await until_disconnected(request, job.complete())
    if result is None:
        return Response(status_code=499)
    usage = job.usage
    results = [
        {
            "text": c.text,
            "finish_reason": c.finish_reason,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
        }
        for c in result.choices
    ]
    return JSONResponse({"results": results}, headers=_headers(job))


async def _tokens(job: CompletionJob) -> AsyncIterator[dict[str, Any]]:
    async for chunk in job.chunks():
        if "error" in chunk:
            yield chunk
            return
        for c in chunk.get("choices", []):
            if c.get("index", 0) == 0 and (c.get("text") or c.get("finish_reason")):
                yield {"token": c.get("text", ""), "finish_reason": c.get("finish_reason")}


@router.post("/api/extra/generate/stream", response_model=None)
async def generate_stream(
    body: KoboldGenerateRequest,
    request: Request,
    service: CompletionsDep,
    settings: SettingsDep,
    key: KeyDep,
) -> Response:
    job = await _start(body, request, service, key)
    return sse_response(
        _tokens(job),
        keepalive=settings.keepalive,
        grace=settings.shutdown_grace,
        cancel=job.cancel,
        headers=_headers(job),
        event="message",
        done=False,
    )


@router.post("/api/extra/embeddings", response_model=None)
async def embeddings(
    body: KoboldEmbeddingRequest, request: Request, service: EmbeddingsDep, key: KeyDep
) -> Response:
    """OpenAI's shape, as KoboldCpp answers (SillyTavern's koboldcpp source, KoboldAI
    Lite's TextDB); `truncate` is on unless told otherwise."""
    result = await embed(body, request, service, key)
    if isinstance(result, Response):
        return result
    return json_response(openai_list(result, body.encoding_format), result.ignored)
