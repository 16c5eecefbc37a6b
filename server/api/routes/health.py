"""GET /health: open even when an API key is set."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from server.api.deps import ModelsDep

router = APIRouter()


@router.get("/health")
async def health(models: ModelsDep) -> JSONResponse:
    engines = {name: e.health() for name, e in models.pool.loaded.items()}
    ok = all(h.get("status") == "ok" for h in engines.values())
    body: dict[str, Any] = {"status": "ok" if ok else "error", "models": engines}
    return JSONResponse(body, status_code=200 if ok else 503)
