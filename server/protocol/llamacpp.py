"""llama-server's native API (`/completion`, `/tokenize`, `/detokenize`): request models.

Sampler fields arrive under llama.cpp's names (`n_predict`, `repeat_penalty`,
`samplers`, `[[id, bias]]` logit bias, ...) and are mapped by protocol/aliases.py, as
on every route; the responses are built in api/dialects/llamacpp.py.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.protocol.common import SamplingFields

# /tokenize bodies are bounded by the request body limit; ids lists by this.
MAX_TOKEN_IDS = 1 << 20
MAX_MESSAGES = 4_096


class NativeCompletionRequest(SamplingFields):
    prompt: str | list[int] = Field("", description="Text, or token ids.")
    n_probs: int = Field(0, ge=0, le=20, description="Alternatives per token (probabilities).")
    cache_prompt: bool = Field(True, description="Always on here: prefixes are reused.")


class TokenizeRequest(BaseModel):
    """llama-server's `content`, or vLLM's (and Aphrodite's) `prompt` or `messages`."""

    model_config = ConfigDict(extra="allow")
    content: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = Field(None, max_length=MAX_MESSAGES)
    add_special: bool | None = None
    with_pieces: bool = False
    model: str | None = Field(None, max_length=256)

    @model_validator(mode="after")
    def _something(self) -> TokenizeRequest:
        if sum(x is not None for x in (self.content, self.prompt, self.messages)) != 1:
            raise ValueError("give one of 'content', 'prompt' or 'messages'")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    tokens: list[int] = Field(max_length=MAX_TOKEN_IDS)
    model: str | None = None
