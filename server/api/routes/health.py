"""GET /health: open even when an API key is set."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from server.api.deps import ModelsDep
from server.engine.pool import resident_bytes

router = APIRouter()


@router.get("/health")
async def health(models: ModelsDep) -> JSONResponse:
    engines = {name: e.health() for name, e in models.pool.loaded.items()}
    # 503 while no model can serve: none loaded, or one whose engine stopped.
    ok = bool(engines) and all(h.get("status") == "ok" for h in engines.values())
    status = "ok" if ok else ("error" if engines else "no model loaded")
    if models.starting is not None:
        status = f"{models.starting_phase} model"  # "loading model": llama-server's words
    body: dict[str, Any] = {
        "status": status,
        "models": engines,
        "rss_bytes": resident_bytes() or None,
    }
    now = time.monotonic()
    deaths = {
        model: {"error": why, "seconds_ago": round(now - when, 1)}
        for model, (when, why) in models.pool.deaths.items()
    }
    if deaths:
        body["engine_deaths"] = deaths  # reloaded on the next request, unless failed
    if models.pool.failed:
        body["failed"] = dict(models.pool.failed)
    return JSONResponse(body, status_code=200 if ok else 503)


@router.head("/api/hello", include_in_schema=False)
@router.get("/api/hello")
async def hello() -> dict[str, Any]:
    """Claude Code's connectivity probe (open, like `/`)."""
    return {"status": "ok"}
