"""Ollama's API (`/api/chat`, `/api/generate`, `/api/show`): request models.

Ollama puts sampler values in `options` under llama.cpp's names (`num_predict`,
`repeat_penalty`, ...); they are mapped by protocol/aliases.py like every other route's.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_OPTIONS = 64


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    thinking: str | None = None


class OllamaBase(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(max_length=256)
    stream: bool = True  # Ollama streams unless told not to
    format: Literal["json"] | dict[str, Any] | None = None
    options: dict[str, Any] | None = Field(None, max_length=MAX_OPTIONS)
    keep_alive: str | int | float | None = None
    think: bool | Literal["high", "medium", "low"] | None = Field(
        None, description="Thinking models: false turns it off, a level sets its effort."
    )


class OllamaChatRequest(OllamaBase):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class OllamaGenerateRequest(OllamaBase):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list[str] | None = None


class OllamaShowRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = Field(None, max_length=256)
    name: str | None = Field(None, max_length=256)  # older clients' field
