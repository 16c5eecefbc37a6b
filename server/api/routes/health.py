"""GET /health: open even when an API key is set; what load balancers and routers probe.

200 when a request can be served now: every loaded engine runs, and the default model is
neither loading, nor being loaded again after its engine died, nor failed. 503 otherwise,
with the reason in `status` (llama-server's "loading model" while the start-up model
loads). With nothing loaded and no default model failed it is 200: models load on the
first request that names them.
"""

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
    pool = models.pool
    engines = {name: e.health() for name, e in pool.loaded.items()}
    default = models.default_id()
    if models.starting is not None:
        status = f"{models.starting_phase} model"  # "loading model": llama-server's words
    elif (
        any(h.get("status") != "ok" for h in engines.values())
        or (default is not None and default in pool.failed)
        or models.revive_error is not None
    ):
        status = "error"
    elif models.reviving:
        status = "loading model"
    else:
        status = "ok"
    body: dict[str, Any] = {
        "status": status,
        "models": engines,
        "rss_bytes": resident_bytes() or None,
    }
    now = time.monotonic()
    deaths = {
        model: {"error": why, "seconds_ago": round(now - when, 1)}
        for model, (when, why) in pool.deaths.items()
    }
    if deaths:
        body["engine_deaths"] = deaths
    if models.revive_error is not None:
        body["error"] = models.revive_error
    if pool.failed:
        body["failed"] = dict(pool.failed)
    return JSONResponse(body, status_code=200 if status == "ok" else 503)


@router.head("/api/hello", include_in_schema=False)
@router.get("/api/hello")
async def hello() -> dict[str, Any]:
    """Claude Code's connectivity probe (open, like `/`)."""
    return {"status": "ok"}
