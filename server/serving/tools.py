"""Function calling: tools into the prompt, tool calls out of the output.

Two output formats are understood, picked by the template:
- Hermes (ChatML, most GGUF templates): `<tool_call>{"name": .., "arguments": {..}}</tool_call>`
- Mistral: `[TOOL_CALLS][{"name": .., "arguments": {..}}, ..]`, or `[TOOL_CALLS]name[ARGS]{..}`

`tool_choice` "required" or naming a function is enforced: the call marker is written
into the prompt as assistant prefill, and a grammar built from the tools' JSON schemas
constrains what follows, so the call always parses and its arguments validate.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from server.engine.grammar import GrammarError, json_schema_grammar
from server.errors import BadRequestError
from server.protocol.chat import FunctionCall, Tool, ToolCall
from server.templates import ChatTemplate

ToolFormat = Literal["hermes", "mistral"]

MARKERS: dict[ToolFormat, str] = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}


def tool_format(template: ChatTemplate) -> ToolFormat:
    if template.name == "mistral" or "[TOOL_CALLS]" in template.source:
        return "mistral"
    return "hermes"


def renders_tools(template: ChatTemplate) -> bool:
    """Whether the template itself writes the tool list into the prompt."""
    return "tools" in template.source


def tools_system_prompt(tools: list[dict[str, Any]], fmt: ToolFormat) -> str:
    """Instructions + tool signatures, for templates that do not render tools themselves."""
    signatures = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    if fmt == "mistral":
        example = '[TOOL_CALLS][{"name": <function-name>, "arguments": <args-json-object>}]'
    else:
        example = (
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        )
    return (
        "You may call one or more functions to assist with the user query. The functions"
        f" available are:\n<tools>\n{signatures}\n</tools>\n\nTo call a function, reply"
        f" with:\n{example}"
    )


def call_as_text(calls: list[dict[str, Any]], fmt: ToolFormat) -> str:
    """Earlier assistant tool calls, written back in the model's own format."""
    items = [
        {"name": c["function"]["name"], "arguments": _json_or_text(c["function"]["arguments"])}
        for c in calls
    ]
    if fmt == "mistral":
        return "[TOOL_CALLS]" + json.dumps(items, ensure_ascii=False)
    return "\n".join(
        f"<tool_call>\n{json.dumps(i, ensure_ascii=False)}\n</tool_call>" for i in items
    )


def _json_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools and tool_choice mean for the prompt and the sampler."""

    fmt: ToolFormat
    tools: list[dict[str, Any]]
    parse: bool  # look for calls in the output
    prefill: str = ""  # marker written as the start of the assistant turn
    grammar: str | None = None


def plan_tools(tools: list[Tool] | None, choice: Any, template: ChatTemplate) -> ToolPlan | None:
    if not tools:
        if choice not in (None, "none", "auto"):
            raise BadRequestError("tool_choice needs a non-empty 'tools' list", param="tool_choice")
        return None
    fmt = tool_format(template)
    dumped = [t.model_dump(exclude_none=True) for t in tools]
    if choice in (None, "auto"):
        return ToolPlan(fmt, dumped, parse=True)
    if choice == "none":
        return ToolPlan(fmt, [], parse=False)
    if choice == "required":
        chosen = tools
    elif isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        chosen = [t for t in tools if t.function.name == name]
        if not chosen:
            raise BadRequestError(
                f"tool_choice names function '{name}', which is not in 'tools'",
                param="tool_choice",
            )
    else:
        raise BadRequestError(
            "tool_choice must be 'none', 'auto', 'required' or"
            ' {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    return ToolPlan(fmt, dumped, True, *_forced_call(chosen, fmt))


def _forced_call(tools: list[Tool], fmt: ToolFormat) -> tuple[str, str]:
    """(prefill, grammar) that make the model call one of `tools`."""
    schema = {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t.function.name},
                    "arguments": t.function.parameters or {"type": "object"},
                },
                "required": ["name", "arguments"],
            }
            for t in tools
        ]
    }
    try:
        rules = json_schema_grammar(schema, "call")
    except GrammarError as exc:
        raise BadRequestError(f"tools: {exc}", param="tools") from exc
    if fmt == "mistral":
        return "[TOOL_CALLS]", rules + '\nroot ::= "[" call ("," space call)* "]"'
    return "<tool_call>\n", rules + '\nroot ::= call "\\n</tool_call>"'


@dataclass
class ToolCallStream:
    """Splits generated text into content and tool calls, as it streams.

    Text before the call marker is content and passes through (holding back only what
    could be the start of the marker); from the marker on, text is buffered and parsed
    into calls at the end.
    """

    fmt: ToolFormat
    prefill: str = ""
    _pending: str = ""
    _calls_text: str | None = None
    calls: list[ToolCall] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.prefill:
            self._calls_text = self.prefill

    def push(self, text: str) -> str:
        if self._calls_text is not None:
            self._calls_text += text
            return ""
        self._pending += text
        marker = MARKERS[self.fmt]
        at = self._pending.find(marker)
        if at >= 0:
            out, self._calls_text = self._pending[:at], self._pending[at:]
            self._pending = ""
            return out
        keep = partial_suffix(self._pending, marker)
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(out) :]
        return out

    def finish(self) -> str:
        """Parse buffered calls into `self.calls`; return content still held back."""
        out, self._pending = self._pending, ""
        if self._calls_text is not None:
            self.calls = parse_tool_calls(self._calls_text, self.fmt)
            if not self.calls:  # a marker with nothing parseable: give the text back
                out = self._calls_text + out
        return out


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_NAMED = re.compile(r"\s*([\w.-]+)\s*\[ARGS\]\s*")


def parse_tool_calls(text: str, fmt: ToolFormat) -> list[ToolCall]:
    items: list[Any] = []
    decoder = json.JSONDecoder()
    if fmt == "hermes":
        for body in _HERMES.findall(text):
            try:
                items.append(json.loads(body))
            except ValueError:
                continue
    else:
        for part in text.split("[TOOL_CALLS]")[1:]:
            try:
                named = _NAMED.match(part)
                if named:  # newer Mistral tokenizers: name[ARGS]{...}
                    args, _ = decoder.raw_decode(part[named.end() :])
                    items.append({"name": named.group(1), "arguments": args})
                else:  # [{"name": ..., "arguments": ...}, ...]
                    value, _ = decoder.raw_decode(part.strip())
                    items.extend(value if isinstance(value, list) else [value])
            except ValueError:
                continue
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            continue
        args = item.get("arguments", item.get("parameters", {}))
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        calls.append(
            ToolCall(
                id="call_" + secrets.token_hex(12),
                function=FunctionCall(
                    name=item["name"],
                    arguments=args,
                ),
            )
        )
    return calls
