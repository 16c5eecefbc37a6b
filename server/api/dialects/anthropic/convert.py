"""An Anthropic Messages request as our one chat request.

System blocks join into one system message (Claude Code's per-request billing line is
dropped: its nonce would defeat the prefix cache); content blocks become OpenAI-shaped
messages (`tool_use` -> `tool_calls`, `tool_result` -> `tool` messages, `thinking` ->
`reasoning_content`); consecutive turns of one role merge, as Anthropic's API merges
them; a mid-conversation system message joins the user turn next to it. Sampler fields
sent at the top level (min_p, DRY, banned_strings, grammar, ...) pass through, as on
every route; fields with no meaning here are ignored and reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from server.errors import BadRequestError
from server.protocol.anthropic import Block, MessagesBase, MessagesRequest

BILLING_PREFIX = "x-anthropic-billing-header:"
# Fields of ours (MessagesBase / MessagesRequest) that are translated, not passed on.
_TRANSLATED = {
    "model", "messages", "system", "tools", "tool_choice", "thinking", "max_tokens",
    "stop_sequences", "stream", "temperature", "top_p", "top_k", "metadata",
}  # fmt: skip
# Block types that carry nothing a text model can use; dropped without a word.
_SILENT = {"redacted_thinking", "server_tool_use", "web_search_tool_result"}


@dataclass
class Converted:
    body: dict[str, Any]  # a ChatCompletionRequest's fields
    ignored: list[str] = field(default_factory=list)
    single_tool_call: bool = False  # disable_parallel_tool_use
    show_thinking: bool = True
    omit_thinking_text: bool = False  # thinking.display == "omitted"
    prewarm: bool = False  # max_tokens 0: fill the prompt cache, generate nothing


def _text_of(blocks: list[Block] | str, param: str, ignored: list[str]) -> str:
    """Text of system blocks or tool-result content (text and text documents)."""
    if isinstance(blocks, str):
        return blocks
    parts: list[str] = []
    for k, b in enumerate(blocks):
        extra = b.model_extra or {}
        if b.type == "text":
            parts.append(str(extra.get("text", "")))
        elif b.type == "image":
            raise BadRequestError(
                "this model takes text only; image blocks are not supported",
                param=f"{param}.{k}",
            )
        elif b.type == "document" and (extra.get("source") or {}).get("type") == "text":
            parts.append(str(extra["source"].get("data", "")))
        elif b.type not in _SILENT:
            ignored.append(f"{param}.{b.type}")
    return "\n".join(parts)


def system_text(system: str | list[Block] | None, ignored: list[str]) -> str:
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    kept = [
        b
        for b in system
        if not (
            b.type == "text"
            and str((b.model_extra or {}).get("text", "")).startswith(BILLING_PREFIX)
        )
    ]
    texts = [_text_of([b], "system", ignored) for b in kept]
    return "\n\n".join(t for t in texts if t)


def _tool_result(b: Block, where: str, ignored: list[str]) -> dict[str, Any]:
    extra = b.model_extra or {}
    content = extra.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        blocks = [Block.model_validate(c) if isinstance(c, dict) else None for c in content]
        if any(x is None for x in blocks):
            raise BadRequestError(f"{where}: content must be a string or blocks", param=where)
        text = _text_of([x for x in blocks if x is not None], where, ignored)
    else:
        raise BadRequestError(f"{where}: content must be a string or blocks", param=where)
    if extra.get("is_error"):
        text = f"Error: {text}"
    tool_id = extra.get("tool_use_id")
    if not isinstance(tool_id, str):
        raise BadRequestError(f"{where}: tool_result needs a 'tool_use_id'", param=where)
    return {"role": "tool", "tool_call_id": tool_id, "content": text}


def _messages(body: MessagesBase, ignored: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, m in enumerate(body.messages):
        where = f"messages.{i}.content"
        role = "user" if m.role == "system" else m.role  # mid-conversation system: a user turn
        if isinstance(m.content, str):
            _add(out, role, _as_system(m.content) if m.role == "system" else m.content)
            continue
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        thinking: list[str] = []
        for j, b in enumerate(m.content):
            extra = b.model_extra or {}
            if b.type == "text":
                texts.append(str(extra.get("text", "")))
            elif b.type == "tool_use" and role == "assistant":
                name, tool_id = extra.get("name"), extra.get("id")
                if not isinstance(name, str) or not isinstance(tool_id, str):
                    raise BadRequestError(
                        f"{where}.{j}: tool_use needs 'id' and 'name'", param=where
                    )
                args = json.dumps(extra.get("input") or {}, ensure_ascii=False)
                calls.append(
                    {
                        "id": tool_id,
                        "type": "function",
                        "function": {"name": name, "arguments": args},
                    }
                )
            elif b.type == "tool_result" and role == "user":
                # Results answer the assistant's calls: they come before this turn's text.
                out.append(_tool_result(b, f"{where}.{j}", ignored))
            elif b.type == "thinking" and role == "assistant":
                thinking.append(str(extra.get("thinking", "")))
            else:
                texts.append(_text_of([b], f"{where}.{j}", ignored))
        text = "\n".join(t for t in texts if t)
        if m.role == "system":
            text = _as_system(text)
        if text or calls or thinking or not m.content:
            _add(out, role, text, calls, "\n".join(thinking))
    return out


def _as_system(text: str) -> str:
    """A mid-conversation system message, marked as such inside the user turn."""
    return f"<system>\n{text}\n</system>" if text else ""


def _add(
    out: list[dict[str, Any]],
    role: str,
    text: str,
    calls: list[dict[str, Any]] | None = None,
    thinking: str = "",
) -> None:
    """Append a turn, merging it into the previous one of the same role."""
    last = out[-1] if out else None
    if last is not None and last["role"] == role and not last.get("tool_calls") and role != "tool":
        last["content"] = "\n\n".join(t for t in (last["content"], text) if t)
        if calls:
            last["tool_calls"] = calls
        if thinking:
            last["reasoning_content"] = thinking
        return
    entry: dict[str, Any] = {"role": role, "content": text}
    if calls:
        entry["tool_calls"] = calls
    if thinking:
        entry["reasoning_content"] = thinking
    out.append(entry)


def _tools(body: MessagesBase, ignored: list[str]) -> list[dict[str, Any]] | None:
    if body.tools is None:
        return None
    tools = []
    for t in body.tools:
        if t.is_server_tool:
            ignored.append(f"tools.{t.name}")  # web search etc.: nothing here runs them
            continue
        fn: dict[str, Any] = {"name": t.name, "parameters": t.input_schema or {"type": "object"}}
        if t.description:
            fn["description"] = t.description
        tools.append({"type": "function", "function": fn})
    return tools


def _tool_choice(choice: dict[str, Any] | None, has_tools: bool) -> tuple[Any, bool]:
    """(OpenAI tool_choice, single call only)."""
    if choice is None:
        return None, False
    kind = choice.get("type")
    single = bool(choice.get("disable_parallel_tool_use"))
    if not has_tools:
        return None, single  # Anthropic allows a choice with no tools: nothing to call
    if kind == "auto":
        return "auto", single
    if kind == "any":
        return "required", single
    if kind == "none":
        return "none", single
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str):
            raise BadRequestError("tool_choice: type 'tool' needs a 'name'", param="tool_choice")
        return {"type": "function", "function": {"name": name}}, single
    raise BadRequestError(
        "tool_choice.type must be 'auto', 'any', 'tool' or 'none'", param="tool_choice"
    )


def to_chat(body: MessagesBase) -> Converted:
    """The chat request fields for an Anthropic request (count_tokens' too)."""
    ignored: list[str] = []
    messages = _messages(body, ignored)
    system = system_text(body.system, ignored)
    if system:
        messages.insert(0, {"role": "system", "content": system})
    if not messages:
        raise BadRequestError("messages: at least one message is required", param="messages")
    tools = _tools(body, ignored)
    choice, single = _tool_choice(body.tool_choice, bool(tools))
    # No middle-out by default: an agent needs "prompt is too long" to compact its history,
    # not a conversation with its middle silently gone (a client may still ask for it).
    chat: dict[str, Any] = {"model": body.model, "messages": messages, "transforms": []}
    if tools:
        chat["tools"] = tools
    if choice is not None:
        chat["tool_choice"] = choice
    out = Converted(chat, ignored, single_tool_call=single)
    thinking = body.thinking
    if thinking is not None:
        if thinking.type == "disabled":
            chat["reasoning"] = {"enabled": False}
            out.show_thinking = False
        elif thinking.type == "enabled" and thinking.budget_tokens is not None:
            chat["reasoning"] = {"max_tokens": thinking.budget_tokens}
        out.omit_thinking_text = thinking.display == "omitted"
    for name, value in (body.model_extra or {}).items():
        if name not in _TRANSLATED:
            chat[name] = value  # our sampler extensions; anything else is reported
    if isinstance(body, MessagesRequest):
        _sampling(body, out)
    return out


def _sampling(body: MessagesRequest, out: Converted) -> None:
    chat = out.body
    for name in ("temperature", "top_p", "top_k"):
        value = getattr(body, name)
        if value is not None:
            chat[name] = value
    if body.stop_sequences:
        chat["stop"] = body.stop_sequences
    if body.max_tokens == 0:
        out.prewarm = True
        chat["max_tokens"] = 1
    elif body.max_tokens is not None:
        chat["max_tokens"] = body.max_tokens
    if body.metadata:
        out.ignored.append("metadata")
