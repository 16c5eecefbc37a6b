"""GET /v1/models, one model, what is loaded (/v1/ps), and load/unload on demand."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from server.api.deps import DownloadsDep, ModelsDep
from server.protocol.models import ModelCard, ModelList

router = APIRouter()


@router.get("/models")
async def list_models(models: ModelsDep, all: bool = False) -> ModelList:
    """Models that can load now; `?all=true` adds those not downloaded."""
    return ModelList(data=models.cards(everything=all))


@router.get("/ps")
async def loaded_models(models: ModelsDep) -> dict[str, Any]:
    """Loaded (and loading) models: memory, idle time, slots busy, when they unload."""
    return {"models": models.status()}


@router.post("/models/{model_id:path}/load")
async def load_model(model_id: str, models: ModelsDep) -> dict[str, Any]:
    """Loads the model (also one marked failed after repeated engine deaths)."""
    models.pool.clear_failure(models.resolve(model_id).id)
    served = await models.get(model_id)
    entry = next(s for s in models.status() if s["model"] == served.spec.id)
    return {"model": served.spec.id, "loaded": True, **entry}


@router.post("/models/{model_id:path}/unload")
async def unload_model(model_id: str, models: ModelsDep) -> dict[str, Any]:
    """Unloads at once if idle, else once its replies are done."""
    was_loaded = await models.unload(model_id)
    spec = models.resolve(model_id)
    return {"model": spec.id, "was_loaded": was_loaded, "loaded": models.pool.is_loaded(spec.id)}


@router.post("/models/{model_id:path}/pull")
async def pull_model(model_id: str, models: ModelsDep, downloads: DownloadsDep) -> JSONResponse:
    """Starts downloading the model (202; the status feed shows its progress), or joins
    the download under way; 200 when its file is here already."""
    spec = models.resolve(model_id)
    pull = downloads.pull(spec)
    if pull is None:
        return JSONResponse({"model": spec.id, "state": "done", "downloaded": True})
    return JSONResponse({**pull.to_json(), "downloaded": False}, status_code=202)


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, models: ModelsDep) -> ModelCard:
    return models.card(model_id)
