"""GET /v1/models."""

from __future__ import annotations

from fastapi import APIRouter

from server.api.deps import ModelsDep
from server.protocol.models import ModelCard, ModelList

router = APIRouter()


@router.get("/models")
async def list_models(models: ModelsDep) -> ModelList:
    return ModelList(data=models.cards())


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, models: ModelsDep) -> ModelCard:
    spec = models.registry.get(model_id)
    return next(c for c in models.cards() if c.id == model_id or c.id == spec.id)
