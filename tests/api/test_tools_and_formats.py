"""Tools, tool_choice, response_format: what reaches the engine and what comes back."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from tests.api.conftest import Api

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(autouse=True)
def _roomy_context(api: Api) -> None:
    # Tool signatures make long prompts; the fake tokenizer is one token per character.
    api.engine.info = dataclasses.replace(api.engine.info, n_ctx=4096)


def prompt_text(api: Api) -> str:
    return "".join(chr(t) for t in api.engine.requests[-1].prompt_tokens[1:])


def test_hermes_tool_call_is_parsed(api: Api, stream: bool) -> None:
    api.engine.reply = (
        'Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
        "\n</tool_call>"
    )
    r, body = api.chat({"tools": [WEATHER]}, stream)
    assert r.status_code == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me look."
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}
    assert "get_weather" in prompt_text(api)  # the tool list reached the prompt
    assert api.engine.requests[-1].render_special


def test_mistral_tool_calls_are_parsed(api: Api, stream: bool) -> None:
    api.engine.reply = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}]'
    _, body = api.chat({"tools": [WEATHER], "template": "mistral"}, stream)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert not choice["message"]["content"]
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {
        "city": "Rome"
    }


def test_text_without_a_call_stays_content(api: Api, stream: bool) -> None:
    api.engine.reply = "No tools needed <tool"
    _, body = api.chat({"tools": [WEATHER]}, stream)
    assert body["choices"][0]["message"]["content"] == "No tools needed <tool"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert not body["choices"][0]["message"].get("tool_calls")


def test_named_tool_choice_forces_a_call_by_grammar(api: Api, stream: bool) -> None:
    api.engine.reply = '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    choice = {"type": "function", "function": {"name": "get_weather"}}
    _, body = api.chat({"tools": [WEATHER], "tool_choice": choice}, stream)
    req = api.engine.requests[-1]
    assert req.params.grammar is not None and '"\\"get_weather\\""' in req.params.grammar
    assert prompt_text(api).endswith("<tool_call>\n")  # the marker is prefilled
    call = body["choices"][0]["message"]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_tool_choice_none_leaves_tools_out(api: Api) -> None:
    api.engine.reply = "<tool_call>{}</tool_call>"
    _, body = api.chat({"tools": [WEATHER], "tool_choice": "none"}, False)
    assert "get_weather" not in prompt_text(api)
    assert body["choices"][0]["message"]["content"] == "<tool_call>{}</tool_call>"


@pytest.mark.parametrize(
    "extra",
    [
        {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tool_choice": "sometimes"},
    ],
)
def test_bad_tool_choice_is_400(api: Api, extra: dict[str, Any]) -> None:
    r, body = api.chat({"tools": [WEATHER], **extra}, False)
    assert r.status_code == 400 and body["error"]["param"] == "tool_choice"


def test_tool_choice_without_tools_is_400(api: Api) -> None:
    r, body = api.chat({"tool_choice": "required"}, False)
    assert r.status_code == 400 and body["error"]["param"] == "tool_choice"


def test_tool_history_is_rendered(api: Api) -> None:
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12C, rain"},
    ]
    r, _ = api.chat({"messages": messages, "tools": [WEATHER]}, False)
    assert r.status_code == 200
    text = prompt_text(api)
    assert '"city": "Oslo"' in text and "12C, rain" in text


def test_json_object_sets_a_json_grammar(api: Api, stream: bool) -> None:
    api.chat({"response_format": {"type": "json_object"}}, stream)
    grammar = api.engine.requests[-1].params.grammar
    assert grammar is not None and "root" in grammar and "object" in grammar


def test_json_schema_sets_a_schema_grammar(api: Api) -> None:
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": schema, "strict": True}}
    r, _ = api.chat({"response_format": fmt}, False)
    assert r.status_code == 200
    grammar = api.engine.requests[-1].params.grammar
    assert grammar is not None and '"\\"age\\""' in grammar


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "json_schema"},
        {"type": "xml"},
        {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/missing"}}},
    ],
)
def test_bad_response_format_is_400(api: Api, fmt: dict[str, Any]) -> None:
    r, body = api.chat({"response_format": fmt}, False)
    assert r.status_code == 400
    assert body["error"]["param"].startswith("response_format")
