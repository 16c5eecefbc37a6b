"""Chat messages -> prompt tokens: template, names, content parts, assistant prefill, BOS."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.engine.types import Engine
from server.errors import BadRequestError
from server.protocol.chat import ChatMessage, ImagePart, TextPart
from server.serving.tools import (
    ToolPlan,
    call_as_text,
    renders_tools,
    tool_format,
    tools_system_prompt,
)
from server.templates import ChatTemplate
from server.templates.render import TemplateError


@dataclass(frozen=True)
class Prompt:
    text: str
    tokens: list[int]
    prefill: str  # the assistant text the model continues, "" when none


def _content(message: ChatMessage, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, ImagePart):
            raise BadRequestError(
                "this model takes text only; image parts are not supported",
                param=f"messages[{index}].content",
            )
        if isinstance(part, TextPart):
            parts.append(part.text)
    return "".join(parts)


def to_template_messages(
    messages: list[ChatMessage], template: ChatTemplate, tools: ToolPlan | None = None
) -> list[dict[str, Any]]:
    """Plain dicts for the template; `name` becomes a `{name}: ` prefix unless it knows names.

    For templates that know nothing of tools, earlier tool calls are written into the
    assistant's text in the model's format, and the tool list goes into the system prompt.
    """
    knows_names = "name" in template.source
    knows_tools = renders_tools(template)
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        content = _content(m, i)
        if m.name and not knows_names and m.role in ("user", "assistant", "system"):
            content = f"{m.name}: {content}"
        role = "system" if m.role == "developer" else m.role
        entry: dict[str, Any] = {"role": role, "content": content}
        if m.name:
            entry["name"] = m.name
        if m.tool_calls:
            entry["tool_calls"] = [tc.model_dump() for tc in m.tool_calls]
            if not knows_tools:
                fmt = tools.fmt if tools is not None else tool_format(template)
                text = call_as_text(entry["tool_calls"], fmt)
                entry["content"] = f"{content}\n{text}" if content else text
        if m.tool_call_id:
            entry["tool_call_id"] = m.tool_call_id
        if m.reasoning_content and m.role == "assistant":
            entry["reasoning_content"] = m.reasoning_content  # templates that replay it
        out.append(entry)
    if tools is not None and tools.tools and not knows_tools:
        block = tools_system_prompt(tools.tools, tools.fmt)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def build_prompt(
    engine: Engine,
    template: ChatTemplate,
    messages: list[ChatMessage],
    tools: ToolPlan | None = None,
    extra: dict[str, Any] | None = None,
) -> Prompt:
    text, prefill = render_prompt(engine, template, messages, tools, extra)
    return Prompt(text, tokenize_prompt(engine, text), prefill)


def render_prompt(
    engine: Engine,
    template: ChatTemplate,
    messages: list[ChatMessage],
    tools: ToolPlan | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[str, str]:
    """The prompt text, and the assistant prefill it ends with ("" when none)."""
    msgs = to_template_messages(messages, template, tools)
    prefill = ""
    if len(msgs) > 1 and msgs[-1]["role"] == "assistant":
        # Assistant prefill: render the turns before it, open the assistant turn, continue.
        prefill = msgs[-1]["content"]
        msgs = msgs[:-1]
    info = engine.info
    try:
        text = template.render(
            msgs,
            bos_token=info.bos_token,
            eos_token=info.eos_token,
            tools=tools.tools if tools is not None and tools.tools else None,
            extra=extra,
        )
    except TemplateError as exc:
        raise BadRequestError(str(exc), param="messages") from exc
    text += prefill
    if tools is not None:
        text += tools.prefill  # a forced tool call starts with its marker
    return text, prefill


def byte_limit(engine: Engine) -> int:
    """Texts longer than this (in UTF-8 bytes) cannot fit the context, whatever they say."""
    info = engine.info
    return info.n_ctx * info.max_token_bytes


def clip_middle(text: str, limit: int) -> str:
    """`text` with its middle removed to at most `limit` bytes (for middle-out, before
    tokenizing: the tokens of the part removed would be dropped anyway)."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    half = limit // 2
    head = data[:half].decode("utf-8", errors="ignore")
    tail = data[len(data) - half :].decode("utf-8", errors="ignore")
    return head + tail


def tokenize_prompt(engine: Engine, text: str) -> list[int]:
    """Tokenize with the model's BOS exactly once, whether or not the template wrote it."""
    info = engine.info
    if info.add_bos and info.bos_token and text.startswith(info.bos_token):
        tokens = engine.tokenize(text, add_special=False)
    else:
        tokens = engine.tokenize(text, add_special=True)
    if not tokens:
        # An empty prompt: start from BOS, as a model's first token always follows it.
        if info.bos_id < 0:
            raise BadRequestError(
                "the prompt is empty and this model has no BOS token to start from",
                param="prompt",
            )
        tokens = [info.bos_id]
    return tokens
