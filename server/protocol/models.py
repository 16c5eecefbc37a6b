"""`/v1/models`: OpenAI's model object with OpenRouter's extra fields."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator


class Architecture(BaseModel):
    modality: str = "text->text"
    input_modalities: list[str] = Field(default_factory=lambda: ["text"])
    output_modalities: list[str] = Field(
        default_factory=lambda: ["text"], description="`embeddings` for an embedding model."
    )
    tokenizer: str = "Other"
    instruct_type: str | None = None


class Pricing(BaseModel):
    prompt: str = "0"
    completion: str = "0"
    request: str = "0"
    image: str = "0"


class TopProvider(BaseModel):
    context_length: int
    max_completion_tokens: int | None = None
    is_moderated: bool = False


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    type: Literal["model"] = Field("model", description="Anthropic's field, beside OpenAI's.")
    display_name: str = Field("", description="Anthropic's name for `name`.")
    created_at: str = Field("", description="Anthropic's: `created` as RFC 3339.")
    created: int
    owned_by: str = "hostler"
    name: str
    description: str = ""
    context_length: int
    aliases: list[str] = Field(default_factory=list, description="Other names that select it.")
    architecture: Architecture = Field(default_factory=Architecture)
    pricing: Pricing = Field(default_factory=Pricing)
    top_provider: TopProvider
    supported_parameters: list[str] = Field(default_factory=list)
    hostler: dict[str, Any] = Field(default_factory=dict)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
    # Anthropic's pagination: one page holds every model.
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None

    @model_validator(mode="after")
    def _ends(self) -> ModelList:
        if self.data:
            self.first_id, self.last_id = self.data[0].id, self.data[-1].id
        return self
