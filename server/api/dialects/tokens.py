"""Tokenizer endpoints every dialect has in some shape: text -> ids -> text."""

from __future__ import annotations

import asyncio

from server.errors import BadRequestError
from server.serving.models import ModelService


async def encode(
    models: ModelService, text: str, model: str | None, *, add_special: bool = False
) -> list[int]:
    engine = (await models.get(model)).engine
    return await asyncio.to_thread(engine.tokenize, text, add_special=add_special)


async def decode(models: ModelService, ids: list[int], model: str | None) -> str:
    engine = (await models.get(model)).engine
    n_vocab = engine.info.n_vocab
    bad = next((t for t in ids if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise BadRequestError(
            f"tokens: id {bad} is outside the vocabulary (0..{n_vocab - 1})", param="tokens"
        )
    return "".join(engine.token_text(t) for t in ids)
