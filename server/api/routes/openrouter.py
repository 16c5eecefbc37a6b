"""OpenRouter extras: generation stats and the calling key."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from server.api.deps import GenerationsDep, KeyDep
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
async def auth_key(key: KeyDep) -> dict[str, Any]:
    """The calling key, as OpenRouter describes it: usage (tokens today) and limits."""
    return {"data": key.describe()}
