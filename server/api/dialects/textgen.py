"""TabbyAPI's and text-generation-webui's routes beyond the OpenAI ones: model info and
tokenizer (SillyTavern's status check calls them before it lets a user chat). Their
generation goes through `/v1/completions`, with their field names read by
protocol/aliases.py."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from server.api.deps import ModelsDep
from server.api.dialects.tokens import decode, encode
from server.protocol.models import ModelList
from server.protocol.textgen import TextRequest, TokensRequest

router = APIRouter()


@router.get("/model/list")
async def tabby_model_list(models: ModelsDep) -> ModelList:
    return ModelList(data=models.cards())


@router.get("/model")
async def tabby_model(models: ModelsDep) -> dict[str, Any]:
    served = await models.get(None)
    return {
        "id": served.spec.id,
        "object": "model",
        "owned_by": "hostler",
        "parameters": {"max_seq_len": served.engine.info.n_ctx},
    }


# TabbyAPI's and text-generation-webui's tokenizer routes have the same shapes.
@router.post("/token/encode")
@router.post("/internal/encode")
async def encode_text(body: TextRequest, models: ModelsDep) -> dict[str, Any]:
    ids = await encode(models, body.text, body.model, add_special=body.add_bos_token)
    return {"tokens": ids, "length": len(ids)}


@router.post("/token/decode")
@router.post("/internal/decode")
async def decode_tokens(body: TokensRequest, models: ModelsDep) -> dict[str, Any]:
    return {"text": await decode(models, body.tokens, body.model)}


@router.post("/internal/token-count")
async def ooba_token_count(body: TextRequest, models: ModelsDep) -> dict[str, Any]:
    return {"length": len(await encode(models, body.text, body.model))}


@router.get("/internal/model/info")
async def ooba_model_info(models: ModelsDep) -> dict[str, Any]:
    served = await models.get(None)
    return {"model_name": served.spec.id, "lora_names": []}
