"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`): wire models.

Lenient where clients vary (unknown fields and block types are kept, then ignored and
reported), bounded where a body could cost memory or time: the number of messages,
content blocks and tools, and the size of tool schemas, are checked before anything
is rendered or tokenized.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.protocol.common import INT32_MAX

MAX_MESSAGES = 4_096
MAX_BLOCKS = 8_192  # content blocks in the whole request (system, messages, tool results)
MAX_TOOLS = 256
MAX_TOOL_BYTES = 256 * 1024  # one tool's name, description and input schema as JSON
MAX_DEPTH = 32  # nesting of a tool schema or of a tool_result's content
MAX_STOP_SEQUENCES = 64


def _depth(node: Any, limit: int, depth: int = 0) -> int:
    """How deeply `node` nests (stops counting past `limit`)."""
    if depth > limit:
        return depth
    if isinstance(node, dict):
        return max((_depth(v, limit, depth + 1) for v in node.values()), default=depth)
    if isinstance(node, list):
        return max((_depth(v, limit, depth + 1) for v in node), default=depth)
    return depth


class Block(BaseModel):
    """One content block; its other fields stay as sent (text, id, input, content...)."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(max_length=64)


class MessageParam(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["user", "assistant", "system"]
    content: str | list[Block]


class ToolParam(BaseModel):
    """A custom tool (`input_schema`), or a server tool (a `type`, no schema)."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = Field(None, max_length=64)

    @property
    def is_server_tool(self) -> bool:
        return self.input_schema is None and self.type not in (None, "custom")


class ThinkingParam(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=0, le=INT32_MAX)
    display: str | None = None


class MessagesBase(BaseModel):
    """What `/v1/messages` and `/v1/messages/count_tokens` share."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = Field(None, max_length=256)
    messages: list[MessageParam] = Field(max_length=MAX_MESSAGES)
    system: str | list[Block] | None = None
    tools: list[ToolParam] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: dict[str, Any] | None = None
    thinking: ThinkingParam | None = None

    @model_validator(mode="before")
    @classmethod
    def _modelslab(cls, data: Any) -> Any:
        # ModelsLab's sample code names the model `model_id`.
        if isinstance(data, dict) and ("model_id" in data or "key" in data):
            data = dict(data)
            model_id = data.pop("model_id", None)
            if data.get("model") is None:
                data["model"] = model_id
            data.pop("key", None)  # the API key in the body: checked in api/deps.py
        return data

    @field_validator("tools")
    @classmethod
    def _tool_size(cls, tools: list[ToolParam] | None) -> list[ToolParam] | None:
        for i, t in enumerate(tools or []):
            size = len(t.model_dump_json())
            if size > MAX_TOOL_BYTES:
                raise ValueError(f"tool {i} ('{t.name}') is {size} bytes; at most {MAX_TOOL_BYTES}")
            if _depth(t.input_schema, MAX_DEPTH) > MAX_DEPTH:
                raise ValueError(f"tool {i} ('{t.name}'): input_schema nests too deeply")
        return tools

    @model_validator(mode="after")
    def _bounded(self) -> MessagesBase:
        blocks = 0 if not isinstance(self.system, list) else len(self.system)
        for i, m in enumerate(self.messages):
            if isinstance(m.content, str):
                continue
            blocks += len(m.content)
            for j, b in enumerate(m.content):
                if b.type != "tool_result":
                    continue
                content = (b.model_extra or {}).get("content")
                if isinstance(content, list):
                    blocks += len(content)
                if _depth(content, MAX_DEPTH) > MAX_DEPTH:
                    raise ValueError(
                        f"messages.{i}.content.{j}: tool_result content nests too deeply"
                    )
        if blocks > MAX_BLOCKS:
            raise ValueError(f"{blocks} content blocks; at most {MAX_BLOCKS} in one request")
        return self


class MessagesRequest(MessagesBase):
    max_tokens: int | None = Field(
        None, ge=0, le=INT32_MAX, description="Required by Anthropic; unset: up to the context."
    )
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    stream: bool | None = False
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0, le=INT32_MAX)
    metadata: dict[str, Any] | None = None


class CountTokensRequest(MessagesBase):
    pass


class AnthropicUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    service_tier: str = "standard"


class AnthropicMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[dict[str, Any]]
    stop_reason: str | None
    stop_sequence: str | None = None
    usage: AnthropicUsage
