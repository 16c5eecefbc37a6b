"""`/v1/chat/completions`: request, response and stream chunk models."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from server.protocol.common import INT32_MAX, ChoiceLogprobs, SamplingFields, Usage

MAX_TEMPLATE_KWARGS = 32


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["image_url"]
    image_url: dict[str, Any] | str


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = Field(
        None, description="An earlier reply's thinking (DeepSeek's name; `reasoning` too)."
    )

    @model_validator(mode="before")
    @classmethod
    def _reasoning_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and "reasoning" in data and "reasoning_content" not in data:
            data = {**data, "reasoning_content": data["reasoning"]}
            data.pop("reasoning")
        return data


class ReasoningConfig(BaseModel):
    """OpenRouter's `reasoning` object."""

    model_config = ConfigDict(extra="allow")
    effort: Literal["xhigh", "high", "medium", "low", "minimal", "none"] | None = None
    max_tokens: int | None = Field(None, ge=0, le=INT32_MAX)
    exclude: bool = False
    enabled: bool | None = None


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    prompt: str | None = Field(
        None,
        description="OpenRouter: a raw prompt instead of messages (no template); the"
        " choices then carry `text`, as a text completion's do.",
    )
    tools: list[Tool] | None = None
    tool_choice: Any = None
    template: str | None = Field(None, description="Hostler extension: instruct preset to use.")
    reasoning: ReasoningConfig | None = Field(
        None, description="OpenRouter: thinking effort or token budget, exclude, enabled."
    )
    include_reasoning: bool | None = Field(
        None, description="OpenRouter's older switch: false leaves the thinking out."
    )
    reasoning_effort: Literal["xhigh", "high", "medium", "low", "minimal", "none"] | None = None
    chat_template_kwargs: dict[str, str | int | float | bool | None] | None = Field(
        None,
        max_length=MAX_TEMPLATE_KWARGS,
        description="llama-server's extra template variables (e.g. enable_thinking).",
    )

    @model_validator(mode="after")
    def _messages_or_prompt(self) -> ChatCompletionRequest:
        if self.messages is None and self.prompt is None:
            raise ValueError("either 'messages' or 'prompt' is required")
        return self


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning: str | None = Field(None, description="The thinking (OpenRouter's name).")
    reasoning_content: str | None = Field(None, description="The same (DeepSeek's name).")
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _keep_null_content(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI sends `"content": null` beside tool calls; keep it when dumping without Nones.
        data: dict[str, Any] = handler(self)
        data.setdefault("content", None)
        return data


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None
    native_finish_reason: str | None = Field(
        None, description="Why it ended, when more specific: `banned_string`."
    )


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDelta(ToolCall):
    index: int


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None
