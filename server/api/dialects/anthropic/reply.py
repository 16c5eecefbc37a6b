"""Our chat reply as Anthropic's `Message`, or as its stream of named events.

Blocks in order, dense indices: thinking (with a signature), text, then tool_use blocks
(their input as `input_json_delta`). `message_start` goes out once the request is
admitted, before its prefill, with the exact prompt and cached counts; `usage` has
Anthropic's meaning (`input_tokens` are those not read from the cache).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

from server.api.dialects.anthropic.convert import Converted
from server.api.dialects.anthropic.errors import anthropic_body
from server.errors import EngineError
from server.protocol.anthropic import AnthropicMessage, AnthropicUsage
from server.protocol.chat import ToolCall
from server.serving.chat import ChatJob, ChatPiece


def message_id() -> str:
    return "msg_" + secrets.token_hex(12)


def signature(thinking: str) -> str:
    """Anthropic clients replay a thinking block's signature; any string does locally."""
    return "hostler-" + hashlib.sha256(thinking.encode()).hexdigest()[:32]


def _tool_block(call: ToolCall) -> dict[str, Any]:
    try:
        args = json.loads(call.function.arguments or "{}")
    except ValueError:
        args = {}
    if not isinstance(args, dict):
        args = {"value": args}
    return {
        "type": "tool_use",
        "id": "toolu_" + call.id.removeprefix("call_"),
        "name": call.function.name,
        "input": args,
    }


class Reply:
    """One Anthropic reply folded from a chat job's pieces."""

    def __init__(self, job: ChatJob, conv: Converted, stops: list[str]) -> None:
        self.job = job
        self.conv = conv
        self.stops = stops
        self.id = message_id()
        self.model = job.job.model_name
        self.finish: str | None = None
        self.stop_string: str | None = None

    def usage(self, output: bool = True) -> AnthropicUsage:
        u = self.job.job.usage
        cached = u.prompt_tokens_details.cached_tokens
        out = 0 if self.conv.prewarm or not output else u.completion_tokens
        return AnthropicUsage(
            input_tokens=u.prompt_tokens - cached,
            output_tokens=out,
            cache_read_input_tokens=cached,
        )

    def stop_reason(self) -> tuple[str, str | None]:
        if self.conv.prewarm:
            return "max_tokens", None
        if self.finish == "tool_calls":
            return "tool_use", None
        if self.finish == "length":
            return "max_tokens", None
        if self.stop_string is not None and self.stop_string in self.stops:
            return "stop_sequence", self.stop_string
        return "end_turn", None

    def _calls(self, calls: list[ToolCall] | None) -> list[ToolCall]:
        calls = calls or []
        return calls[:1] if self.conv.single_tool_call else calls

    def _see(self, p: ChatPiece) -> None:
        if p.finish is not None and p.index == 0:
            self.finish, self.stop_string = p.finish, p.stop_string

    def _thinking_text(self, text: str) -> str:
        return "" if self.conv.omit_thinking_text else text

    async def message(self) -> AnthropicMessage:
        thinking, text, calls = "", "", []
        async for p in self.job.pieces():
            if self.conv.prewarm:
                continue
            thinking += p.reasoning
            text += p.content
            if p.finish is not None:
                calls = self._calls(p.calls)
            self._see(p)
        content: list[dict[str, Any]] = []
        if thinking and self.conv.show_thinking:
            shown = self._thinking_text(thinking)
            content.append(
                {"type": "thinking", "thinking": shown, "signature": signature(thinking)}
            )
        if text:
            content.append({"type": "text", "text": text})
        content += [_tool_block(c) for c in calls]
        reason, sequence = self.stop_reason()
        return AnthropicMessage(
            id=self.id,
            model=self.model,
            content=content,
            stop_reason=reason,
            stop_sequence=sequence,
            usage=self.usage(),
        )

    def _start(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": self.usage(output=False).model_dump(),
        }
        return {"type": "message_start", "message": message}

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Every event as a dict whose `type` is also its SSE event name."""
        blocks = _Blocks()
        started = False
        try:
            async for p in self.job.pieces():
                if not started:
                    started = True
                    yield self._start()
                self._see(p)
                if self.conv.prewarm:
                    continue
                if p.reasoning and self.conv.show_thinking:
                    for e in blocks.delta(
                        "thinking", self._thinking_text(p.reasoning), p.reasoning
                    ):
                        yield e
                if p.content:
                    for e in blocks.delta("text", p.content):
                        yield e
                if p.finish is not None:
                    for e in blocks.close():
                        yield e
                    for call in self._calls(p.calls):
                        for e in blocks.tool(call):
                            yield e
        except EngineError as exc:
            if not started:
                yield self._start()
            yield anthropic_body(exc)
            return
        if not started:
            yield self._start()
        for e in blocks.close():
            yield e
        reason, sequence = self.stop_reason()
        usage = self.usage().model_dump()
        yield {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": usage,
        }
        yield {"type": "message_stop"}


class _Blocks:
    """The open content block of a stream, and the next block's index."""

    def __init__(self) -> None:
        self.index = -1
        self.kind: str | None = None
        self.thought = ""  # the open thinking block's text, for its signature

    def delta(self, kind: str, text: str, raw: str = "") -> list[dict[str, Any]]:
        events = []
        if self.kind != kind:
            events = self.close()
            self.index += 1
            self.kind = kind
            block = {"type": "thinking", "thinking": ""} if kind == "thinking" else None
            block = block or {"type": "text", "text": ""}
            events.append(
                {"type": "content_block_start", "index": self.index, "content_block": block}
            )
        if kind == "thinking":
            self.thought += raw
            delta = {"type": "thinking_delta", "thinking": text}
        else:
            delta = {"type": "text_delta", "text": text}
        if text:
            events.append({"type": "content_block_delta", "index": self.index, "delta": delta})
        return events

    def close(self) -> list[dict[str, Any]]:
        if self.kind is None:
            return []
        events = []
        if self.kind == "thinking":
            sig = {"type": "signature_delta", "signature": signature(self.thought)}
            events.append({"type": "content_block_delta", "index": self.index, "delta": sig})
            self.thought = ""
        events.append({"type": "content_block_stop", "index": self.index})
        self.kind = None
        return events

    def tool(self, call: ToolCall) -> list[dict[str, Any]]:
        block = _tool_block(call)
        self.index += 1
        start = {**block, "input": {}}
        partial = json.dumps(block["input"], ensure_ascii=False)
        return [
            {"type": "content_block_start", "index": self.index, "content_block": start},
            {
                "type": "content_block_delta",
                "index": self.index,
                "delta": {"type": "input_json_delta", "partial_json": partial},
            },
            {"type": "content_block_stop", "index": self.index},
        ]
