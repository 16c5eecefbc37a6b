"""The FastAPI application: built by `create_app`, engines started in `lifespan`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from server import __version__
from server.api import errors
from server.api.deps import require_key
from server.api.dialects import kobold, llamacpp, ollama, textgen
from server.api.dialects.anthropic import routes as anthropic
from server.api.guard import Guard
from server.api.keys import KeyRing
from server.api.metrics import CountRequests, Metrics
from server.api.routes import (
    chat,
    completions,
    embeddings,
    health,
    metrics,
    models,
    openrouter,
    status,
)
from server.config import Settings
from server.engine.pool import ModelPool
from server.engine.types import Engine
from server.errors import DownloadError
from server.registry import ModelsFile, Registry, local_file
from server.serving.chat import ChatService
from server.serving.completions import CompletionService
from server.serving.downloads import Downloads
from server.serving.embeddings import EmbeddingService
from server.serving.generations import GenerationLog
from server.serving.job import JobFactory
from server.serving.models import ModelService, make_check, make_estimate, make_loader
from server.serving.status import StatusBoard

log = logging.getLogger("hostler")


def create_app(
    settings: Settings,
    models_file: ModelsFile,
    loader: Callable[[str], Engine] | None = None,
    check: Callable[[str], None] | None = None,
    estimate: Callable[[str], int] | None = None,
) -> FastAPI:
    """Build the app. `loader` turns a model id into an engine, `check` vets one before
    anything is evicted for it and `estimate` says what memory it takes (tests pass fakes)."""
    registry = Registry(models_file)

    def keep_alive(model_id: str) -> float | None:
        spec = registry.get(model_id)
        if spec.keep_alive is not None:
            return spec.keep_alive_seconds
        return settings.keep_alive_seconds

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        budget = settings.memory_budget_gib
        pool = ModelPool(
            loader or make_loader(registry, settings),
            settings.max_models,
            check=check if loader else make_check(registry),
            estimate=estimate or (None if loader else make_estimate(registry)),
            budget_bytes=None if budget is None else int(budget * 2**30),
            pinned=lambda model_id: registry.get(model_id).pinned,
            keep_alive=keep_alive,
            counted=lambda model_id: not registry.get(model_id).embedding,
        )
        model_service = ModelService(
            registry,
            pool,
            settings.model,
            settings.model_fallback,
            embedding_model=settings.embedding_model,
        )
        generations = GenerationLog()
        meter = Metrics(lambda: pool)
        generations.listeners.append(meter.generation)
        app.state.models = model_service
        app.state.generations = generations
        app.state.metrics = meter
        jobs = JobFactory(model_service, generations)
        app.state.completions = CompletionService(jobs)
        app.state.chat = ChatService(jobs, app.state.completions)
        app.state.embeddings = EmbeddingService(model_service)
        downloads = Downloads(registry)
        app.state.downloads = downloads
        board = StatusBoard(
            model_service, downloads, generations, key_required=lambda: not app.state.keys.open
        )
        app.state.status = board
        reaper = asyncio.ensure_future(_reap(pool, model_service))
        ticker = asyncio.ensure_future(_tick(board))
        startup = None
        if settings.model:
            # Load in the background: meanwhile requests get 503 + Retry-After (as from
            # llama-server) instead of hanging on a port that accepts but never answers.
            model_service.starting = registry.get(settings.model).id
            fetch = None if loader else downloads
            startup = asyncio.ensure_future(_load_at_start(app, model_service, fetch))
        try:
            yield
        finally:
            reaper.cancel()
            ticker.cancel()
            model_service.close()
            downloads.close()
            if startup is not None:
                startup.cancel()
                with contextlib.suppress(BaseException):
                    await startup
            pool.close()

    # The docs need the key too when one is set: served below, behind it.
    app = FastAPI(
        title="Hostler",
        version=__version__,
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.keys = KeyRing(settings)
    app.state.draining = False
    app.state.startup_error = None
    errors.install(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["X-Hostler-Ignored-Params"],
        )
    app.add_middleware(
        Guard,
        hosts=settings.hosts,
        origins=settings.cors_origins,
        max_body=int(settings.max_body_mb * 2**20),
        draining=lambda: bool(app.state.draining),
    )
    app.add_middleware(CountRequests, metrics=lambda: getattr(app.state, "metrics", None))
    api = APIRouter(dependencies=[Depends(require_key)])
    api.include_router(chat.router)
    api.include_router(completions.router)
    api.include_router(embeddings.router)
    api.include_router(models.router)
    api.include_router(openrouter.router)
    api.include_router(anthropic.router)
    # OpenAI clients use /v1; OpenRouter clients use /api/v1.
    app.include_router(api, prefix="/v1")
    app.include_router(api, prefix="/api/v1")
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(status.router)
    app.include_router(status.data)
    # Foreign APIs at their own paths (llama-server's are at the root).
    keyed = [Depends(require_key)]
    app.include_router(llamacpp.router, dependencies=keyed)
    app.include_router(kobold.router, dependencies=keyed)
    app.include_router(textgen.router, prefix="/v1", dependencies=keyed)
    app.include_router(ollama.router, dependencies=keyed)
    app.include_router(_service_routes(app))
    return app


async def _load_at_start(app: FastAPI, models: ModelService, fetch: Downloads | None) -> None:
    """Download (if need be) and load the start-up model; if it cannot, say why and stop
    the server."""
    model_id = models.starting
    assert model_id is not None
    try:
        spec = models.registry.get(model_id)
        if fetch is not None and local_file(spec) is None:
            models.starting_phase = "downloading"
            await fetch.fetch(spec, progress=True)  # the bar on the terminal too
            models.starting_phase = "loading"
        await models.pool.get(model_id)
    except Exception as exc:
        app.state.startup_error = (
            str(exc)
            if isinstance(exc, DownloadError)
            else f"model '{model_id}' could not be loaded: {exc}"
        )
        log.error("%s", app.state.startup_error)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down; `hostler serve` exits 1
    finally:
        models.starting = None


async def _tick(board: StatusBoard, every: float = 1.0) -> None:
    """The status page's plot: one point a second."""
    while True:
        await asyncio.sleep(every)
        try:
            board.tick()
        except Exception:
            log.exception("the status page's tick failed")


async def _reap(pool: ModelPool, models: ModelService, every: float = 1.0) -> None:
    """Unload models whose keep_alive ran out (a request's, e.g. Ollama's `keep_alive`),
    forget dead engines, and load the default model again when its engine died."""
    while True:
        await asyncio.sleep(every)
        try:
            await pool.reap()
            models.revive()
        except Exception:
            log.exception("unloading an expired model failed")


def _service_routes(app: FastAPI) -> APIRouter:
    """The API docs, behind the key like the API itself."""
    router = APIRouter(dependencies=[Depends(require_key)], include_in_schema=False)

    @router.get("/openapi.json")
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @router.get("/docs")
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="Hostler API")

    return router
