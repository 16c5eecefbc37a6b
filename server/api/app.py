"""The FastAPI application: built by `create_app`, engines started in `lifespan`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server import __version__
from server.api import errors
from server.api.deps import require_key
from server.api.routes import chat, completions, health, models, openrouter
from server.config import Settings
from server.engine.pool import ModelPool
from server.engine.types import Engine
from server.registry import ModelsFile, Registry
from server.serving.chat import ChatService
from server.serving.completions import CompletionService
from server.serving.generations import GenerationLog
from server.serving.job import JobFactory
from server.serving.models import ModelService, make_loader

log = logging.getLogger("hostler")


def create_app(
    settings: Settings,
    models_file: ModelsFile,
    loader: Callable[[str], Engine] | None = None,
) -> FastAPI:
    """Build the app. `loader` turns a model id into an engine (tests pass a fake one)."""
    registry = Registry(models_file)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = ModelPool(loader or make_loader(registry, settings), settings.max_models)
        model_service = ModelService(registry, pool, settings.model)
        generations = GenerationLog()
        app.state.settings = settings
        app.state.models = model_service
        app.state.generations = generations
        jobs = JobFactory(model_service, generations)
        app.state.chat = ChatService(jobs)
        app.state.completions = CompletionService(jobs)
        try:
            if settings.model:
                spec = registry.get(settings.model)
                await pool.get(spec.id)
                log.info("model %s loaded", spec.id)
            yield
        finally:
            pool.close()

    app = FastAPI(title="Hostler", version=__version__, lifespan=lifespan)
    errors.install(app)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=["X-Hostler-Ignored-Params"],
    )
    api = APIRouter(dependencies=[Depends(require_key)])
    api.include_router(chat.router)
    api.include_router(completions.router)
    api.include_router(models.router)
    api.include_router(openrouter.router)
    # OpenAI clients use /v1; OpenRouter clients use /api/v1.
    app.include_router(api, prefix="/v1")
    app.include_router(api, prefix="/api/v1")
    app.include_router(health.router)
    return app
