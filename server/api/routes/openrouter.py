"""OpenRouter extras: generation stats and the calling key."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from server.api.deps import GenerationsDep, SettingsDep, bearer_token
from server.errors import BadRequestError, NotFoundError

router = APIRouter()


@router.get("/generation")
async def generation(log: GenerationsDep, id: str | None = None) -> dict[str, Any]:
    if not id:
        raise BadRequestError("the query parameter 'id' is required", param="id")
    record = log.get(id)
    if record is None:
        raise NotFoundError(f"no completed generation with id '{id}'", param="id")
    return {"data": record.to_json()}


@router.get("/auth/key")
async def auth_key(request: Request, settings: SettingsDep) -> dict[str, Any]:
    token = bearer_token(request)
    label = "hostler (no key required)"
    if settings.api_key:
        label = f"hostler key ...{token[-4:]}" if token else "hostler"
    return {
        "data": {
            "label": label,
            "usage": 0,
            "limit": None,
            "is_free_tier": False,
            "rate_limit": {"requests": settings.max_queue, "interval": "queue"},
        }
    }
