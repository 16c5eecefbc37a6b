"""Dependencies: services from app.state, and the API key check.

All are `async def`: FastAPI runs plain `def` dependencies in a thread pool, a thread hop
per dependency per request.
"""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import Depends, Request

from server.api.keys import KeyRing, KeyState
from server.config import Settings
from server.serving.chat import ChatService
from server.serving.completions import CompletionService
from server.serving.downloads import Downloads
from server.serving.embeddings import EmbeddingService
from server.serving.generations import GenerationLog
from server.serving.models import ModelService


async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def _chat(request: Request) -> ChatService:
    service: ChatService = request.app.state.chat
    return service


async def _completions(request: Request) -> CompletionService:
    service: CompletionService = request.app.state.completions
    return service


async def _embeddings(request: Request) -> EmbeddingService:
    service: EmbeddingService = request.app.state.embeddings
    return service


async def _models(request: Request) -> ModelService:
    service: ModelService = request.app.state.models
    return service


async def _downloads(request: Request) -> Downloads:
    downloads: Downloads = request.app.state.downloads
    return downloads


async def _generations(request: Request) -> GenerationLog:
    log: GenerationLog = request.app.state.generations
    return log


SettingsDep = Annotated[Settings, Depends(_settings)]
ChatDep = Annotated[ChatService, Depends(_chat)]
CompletionsDep = Annotated[CompletionService, Depends(_completions)]
ModelsDep = Annotated[ModelService, Depends(_models)]
EmbeddingsDep = Annotated[EmbeddingService, Depends(_embeddings)]
GenerationsDep = Annotated[GenerationLog, Depends(_generations)]
DownloadsDep = Annotated[Downloads, Depends(_downloads)]


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token:
        return token.strip()
    return request.headers.get("x-api-key")


async def body_key(request: Request) -> str | None:
    """ModelsLab's way: the key as `key` in a JSON body (read only when no header has one)."""
    if request.method != "POST":
        return None
    try:
        data = json.loads(await request.body())
    except (ValueError, RecursionError):
        return None  # the route reports the bad body (after the key check)
    key = data.get("key") if isinstance(data, dict) else None
    return key if isinstance(key, str) and key else None


async def require_key(request: Request) -> KeyState:
    """The caller's key (every route but /health); 401 when a key is needed and wrong.
    Sent as `Authorization: Bearer`, `x-api-key` (Anthropic's), or `key` in the body."""
    keys: KeyRing = request.app.state.keys
    token = bearer_token(request)
    if token is None and not keys.open:
        token = await body_key(request)
    state = keys.authenticate(token)
    request.state.key = state
    return state


async def require_metrics_key(request: Request) -> None:
    """/metrics and /v1/loads: readable with the metrics key (`--metrics-key`), so a
    router or scraper needs no user's key; any API key reads them too."""
    keys: KeyRing = request.app.state.keys
    keys.authenticate_metrics(bearer_token(request))


KeyDep = Annotated[KeyState, Depends(require_key)]
