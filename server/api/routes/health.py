"""GET /health: open even when an API key is set."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from server.api.deps import ModelsDep

router = APIRouter()


def _rss_bytes() -> int | None:
    """This process's resident memory, where the OS tells (Linux)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@router.get("/health")
async def health(models: ModelsDep) -> JSONResponse:
    engines = {name: e.health() for name, e in models.pool.loaded.items()}
    # 503 while no model can serve: none loaded, or one whose engine stopped.
    ok = bool(engines) and all(h.get("status") == "ok" for h in engines.values())
    body: dict[str, Any] = {
        "status": "ok" if ok else ("error" if engines else "no model loaded"),
        "models": engines,
        "rss_bytes": _rss_bytes(),
    }
    return JSONResponse(body, status_code=200 if ok else 503)
