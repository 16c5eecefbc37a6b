"""`/v1/completions` (text completion): request, response and stream chunk models."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from server.protocol.common import SamplingFields, Usage

PromptInput = str | list[str] | list[int] | list[list[int]]
# A batch of prompts becomes one job each; more than this is a 400, not a queue flood.
MAX_PROMPTS = 64


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    # The legacy API's logprobs is a count of alternatives (0-20), not a flag.
    logprobs: int | None = Field(None, ge=0, le=20)  # type: ignore[assignment]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, v: PromptInput) -> PromptInput:
        if isinstance(v, list) and (not v or any(isinstance(p, list) and not p for p in v)):
            raise ValueError("must not be empty")
        if isinstance(v, list) and not isinstance(v[0], int) and len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request")
        return v

    @property
    def wanted_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None
    native_finish_reason: str | None = Field(
        None, description="Why it ended, when more specific: `banned_string`."
    )


class Completion(BaseModel):
    id: str
    # OpenRouter answers a `prompt` sent to its chat route in this shape, named as chat.
    object: Literal["text_completion", "chat.completion", "chat.completion.chunk"] = (
        "text_completion"
    )
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


def completion_from(source: SamplingFields, exclude: set[str], **fields: Any) -> CompletionRequest:
    """A text completion carrying the sampler fields `source` was sent with (unknown ones
    too, so they are still reported), less `exclude`, plus `fields`: how the routes that
    take a prompt in another shape (a dialect's, chat's `prompt`) reach CompletionService."""
    data = source.model_dump(exclude_unset=True, by_alias=True, exclude=exclude)
    data.update(fields)
    return CompletionRequest.model_validate(data)
