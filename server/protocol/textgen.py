"""Wire models of the small info and token routes of TabbyAPI, text-generation-webui and
KoboldCpp, and KoboldCpp's own generate API (its sampler fields: protocol/aliases.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from server.protocol.common import SamplingFields
from server.protocol.llamacpp import MAX_TOKEN_IDS


class TextRequest(BaseModel):
    """TabbyAPI's /v1/token/encode and ooba's /v1/internal/encode and token-count."""

    model_config = ConfigDict(extra="allow")
    text: str
    add_bos_token: bool = False
    model: str | None = None


class TokensRequest(BaseModel):
    """TabbyAPI's /v1/token/decode and ooba's /v1/internal/decode."""

    model_config = ConfigDict(extra="allow")
    tokens: list[int] = Field(max_length=MAX_TOKEN_IDS)
    model: str | None = None


class KoboldPrompt(BaseModel):
    """KoboldCpp's /api/extra/tokencount."""

    model_config = ConfigDict(extra="allow")
    prompt: str


class KoboldGenerateRequest(SamplingFields):
    """KoboldCpp's /api/v1/generate and /api/extra/generate/stream."""

    prompt: str = ""
    genkey: str | None = Field(None, max_length=128)


class KoboldAbort(BaseModel):
    model_config = ConfigDict(extra="allow")
    genkey: str | None = None
