"""/v1/messages through the official anthropic SDK (and raw, for the wire details)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest

from tests.api.conftest import Api, make_api, slow_model_app
from tests.api.fake_engine import REPLY

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def big(tmp_path: Path) -> Iterator[Api]:
    """A fake model with a context large enough for tool prompts."""
    gen = make_api(tmp_path, max_models=3)
    api = next(gen)
    api.engine.info = type(api.engine.info)(**{**api.engine.info.__dict__, "n_ctx": 4096})
    yield api
    next(gen, None)


def sdk(api: Api, **kw: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url="http://localhost", api_key="x", http_client=api.client, max_retries=0, **kw
    )


def create(api: Api, stream: bool, **body: Any) -> anthropic.types.Message:
    client = sdk(api)
    body = {"model": "fake", "max_tokens": 100, "messages": HI, **body}
    if not stream:
        return client.messages.create(**body)
    with client.messages.stream(**body) as s:
        for _ in s:
            pass
        return s.get_final_message()


def raw_events(api: Api, body: dict[str, Any], path: str = "/v1/messages") -> list[tuple[str, Any]]:
    full = {"model": "fake", "max_tokens": 100, "messages": HI, "stream": True, **body}
    with api.client.stream("POST", path, json=full) as r:
        assert r.status_code == 200, r.read()
        text = r.read().decode().replace("\r\n", "\n")
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        events.append((lines.get("event", ""), json.loads(lines["data"])))
    return events


def test_text(api: Api, stream: bool) -> None:
    m = create(api, stream)
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant"
    assert [b.type for b in m.content] == ["text"]
    assert m.content[0].text == REPLY  # type: ignore[union-attr]
    assert m.stop_reason == "end_turn" and m.stop_sequence is None
    assert m.model == "fake"
    assert m.usage.input_tokens > 0 and m.usage.output_tokens > 0


def test_stream_events_are_named_and_ordered(api: Api) -> None:
    events = raw_events(api, {}, "/v1/messages?beta=true")
    for name, data in events:
        assert name == data["type"]  # the SDKs dispatch on the event line
    names = [n for n, _ in events if n != "ping"]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names[1] == "content_block_start" and names[-3] == "content_block_stop"
    start = events[0][1]["message"]
    assert start["content"] == [] and start["usage"]["input_tokens"] > 0
    delta = next(d for n, d in events if n == "message_delta")
    assert delta["delta"]["stop_reason"] == "end_turn" and delta["usage"]["output_tokens"] > 0


def test_stop_sequences_and_max_tokens(api: Api, stream: bool) -> None:
    m = create(api, stream, stop_sequences=["friend"])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "friend"
    assert m.content[0].text == "Hello there, "  # type: ignore[union-attr]
    m = create(api, stream, max_tokens=5)
    assert m.stop_reason == "max_tokens"


def test_max_tokens_is_a_cap_not_a_reservation(api: Api) -> None:
    # Claude Code asks for 32000 whatever the context (256 here).
    m = create(api, True, max_tokens=32000)  # the SDK streams such a request anyway
    assert m.stop_reason == "end_turn"


def test_tool_round_trip(big: Api, stream: bool) -> None:
    big.engine.reply = CALL
    m = create(big, stream, tools=[WEATHER])
    assert m.stop_reason == "tool_use"
    (block,) = m.content
    assert block.type == "tool_use" and block.name == "get_weather"
    assert block.input == {"city": "Paris"} and block.id.startswith("toolu_")
    big.engine.reply = "It is sunny."
    history = [
        *HI,
        {"role": "assistant", "content": [block.model_dump(exclude_none=True)]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": block.id, "content": "sunny, 21 C"},
                {"type": "text", "text": "Thanks"},
            ],
        },
    ]
    m = create(big, stream, tools=[WEATHER], messages=history)
    assert m.content[0].text == "It is sunny."  # type: ignore[union-attr]
    prompt = "".join(chr(t) for t in big.engine.requests[-1].prompt_tokens[1:])
    assert "sunny, 21 C" in prompt and '"city": "Paris"' in prompt
    assert prompt.index("sunny, 21 C") < prompt.index("Thanks")


def test_tool_input_streams_as_json_delta(big: Api) -> None:
    big.engine.reply = CALL
    events = raw_events(big, {"tools": [WEATHER]})
    start = next(d for n, d in events if n == "content_block_start")
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["input"] == {}
    deltas = [d["delta"] for n, d in events if n == "content_block_delta"]
    assert deltas and all(d["type"] == "input_json_delta" for d in deltas)
    assert json.loads("".join(d["partial_json"] for d in deltas)) == {"city": "Paris"}


def test_tool_choice_forces_a_call(big: Api) -> None:
    big.engine.reply = '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"}):
        m = create(big, False, tools=[WEATHER], tool_choice=choice)
        assert m.stop_reason == "tool_use"
        assert big.engine.requests[-1].params.grammar is not None
    r = big.client.post(
        "/v1/messages",
        json={"model": "fake", "max_tokens": 10, "messages": HI, "tools": [WEATHER],
              "tool_choice": {"type": "tool", "name": "nope"}},
    )  # fmt: skip
    assert r.status_code == 400 and r.json()["type"] == "error"


def test_server_tools_and_unknown_fields_are_reported(big: Api) -> None:
    body = {
        "model": "fake",
        "max_tokens": 20,
        "messages": HI,
        "tools": [WEATHER, {"type": "web_search_20250305", "name": "web_search"}],
        "context_management": {"edits": []},
        "output_config": {"effort": "high"},
        "metadata": {"user_id": "user_x"},
        "thinking": {"type": "adaptive"},
        "min_p": 0.1,
    }
    r = big.client.post("/v1/messages", json=body)
    assert r.status_code == 200, r.text
    ignored = r.headers["x-hostler-ignored-params"].split(",")
    assert {"context_management", "output_config", "metadata", "tools.web_search"} <= set(ignored)
    assert "min_p" not in ignored  # our extensions are honoured here too
    assert big.engine.requests[-1].params.min_p == pytest.approx(0.1)


def test_extensions_via_extra_body(api: Api) -> None:
    create(api, False, extra_body={"min_p": 0.2, "dry_multiplier": 0.8, "top_k": 5})
    params = api.engine.requests[-1].params
    assert params.min_p == pytest.approx(0.2) and params.dry_multiplier == pytest.approx(0.8)
    assert params.top_k == 5


def test_count_tokens_equals_usage(api: Api) -> None:
    client = sdk(api)
    system = "You are terse."
    counted = client.messages.count_tokens(model="fake", messages=HI, system=system)
    m = client.messages.create(model="fake", max_tokens=10, messages=HI, system=system)
    used = m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0)
    assert counted.input_tokens == used == len(api.engine.requests[-1].prompt_tokens)


def test_billing_nonce_does_not_change_the_prompt(api: Api) -> None:
    def system(nonce: str) -> list[dict[str, Any]]:
        billing = f"x-anthropic-billing-header: cc_version=2.1.197; cch={nonce};"
        return [{"type": "text", "text": billing}, {"type": "text", "text": "You are Claude."}]

    create(api, False, system=system("a5145"))
    create(api, False, system=system("9f3c1"))
    first, second = api.engine.requests[-2:]
    assert first.prompt_tokens == second.prompt_tokens


def test_claude_names_resolve_to_the_default_model(api: Api) -> None:
    m = create(api, False, model="claude-haiku-4-5-20251001")
    assert m.model == "fake"  # the model that really ran
    with pytest.raises(anthropic.NotFoundError) as err:
        create(api, False, model="gpt-9")
    assert "gpt-9" in str(err.value)


def test_system_messages_mid_conversation_and_prefill(api: Api) -> None:
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "system", "content": "Be brief."},
        {"role": "assistant", "content": "{"},
    ]
    m = create(api, False, messages=msgs)
    assert m.stop_reason == "end_turn"
    prompt = "".join(chr(t) for t in api.engine.requests[-1].prompt_tokens[1:])
    assert prompt.endswith("<|im_start|>assistant\n{")  # prefill continued
    assert prompt.count("<|im_start|>user") == 1 and "<system>\nBe brief.\n</system>" in prompt


def test_thinking_in_history_is_accepted(api: Api) -> None:
    msgs = [
        *HI,
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": ""},
                {"type": "redacted_thinking", "data": "xx"},
                {"type": "text", "text": "Hello"},
            ],
        },
        {"role": "user", "content": "Again"},
    ]
    assert create(api, False, messages=msgs).stop_reason == "end_turn"


def test_thinking_blocks(api: Api, stream: bool) -> None:
    api.engine.reply = "<think>Let me see.</think>\n\nHello!"
    m = create(api, stream)
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.content[0].thinking == "Let me see."  # type: ignore[union-attr]
    assert m.content[0].signature  # type: ignore[union-attr]
    assert m.content[1].text == "Hello!"  # type: ignore[union-attr]
    m = create(api, stream, thinking={"type": "disabled"})
    assert [b.type for b in m.content] == ["text"]


def test_thinking_stream_has_signature_before_stop(api: Api) -> None:
    api.engine.reply = "<think>Hmm.</think>Yes."
    events = raw_events(api, {"thinking": {"type": "enabled", "budget_tokens": 1024}})
    kinds = [(d.get("index"), d.get("delta", {}).get("type")) for n, d in events]
    deltas0 = [k for i, k in kinds if i == 0 and k]
    assert deltas0[0] == "thinking_delta" and deltas0[-1] == "signature_delta"
    assert ("content_block_start", 1) in [(n, d.get("index")) for n, d in events]
    assert api.engine.requests[-1].thinking is not None
    assert api.engine.requests[-1].thinking.tokens == 1024


@pytest.mark.parametrize(
    ("status", "kind", "exc"),
    [
        (400, "invalid_request_error", anthropic.BadRequestError),
        (401, "authentication_error", anthropic.AuthenticationError),
        (404, "not_found_error", anthropic.NotFoundError),
        (413, "request_too_large", anthropic.APIStatusError),
        (529, "overloaded_error", anthropic.APIStatusError),
    ],
)
def test_errors_in_anthropic_shape(tmp_path: Path, status: int, kind: str, exc: type) -> None:
    gen = make_api(tmp_path, api_key="sekrit-key-1", max_body_mb=0.01, max_queue=0)
    api = next(gen)
    client = sdk(api)
    client.api_key = "sekrit-key-1"
    body: dict[str, Any] = {"model": "fake", "max_tokens": 10, "messages": HI}
    if status == 400:
        body["extra_body"] = {"temperature": 5}
    elif status == 401:
        client.api_key = "wrong"
    elif status == 404:
        body["model"] = "nope"
    elif status == 413:
        body["messages"] = [{"role": "user", "content": "x" * 20_000}]
    elif status == 529:
        api.engine.max_queue = 0
    with pytest.raises(exc) as err:
        client.messages.create(**body)
    assert err.value.status_code == status  # type: ignore[attr-defined]
    assert err.value.body["type"] == "error"  # type: ignore[attr-defined]
    assert err.value.body["error"]["type"] == kind  # type: ignore[attr-defined]
    next(gen, None)


def test_prompt_too_long_message(api: Api, stream: bool) -> None:
    with pytest.raises(anthropic.BadRequestError) as err:
        create(api, stream, messages=[{"role": "user", "content": "word " * 200}])
    assert "prompt is too long: " in str(err.value) and "> 256 maximum" in str(err.value)


def test_key_as_x_api_key(tmp_path: Path) -> None:
    gen = make_api(tmp_path, api_key="sekrit-key-1")
    api = next(gen)
    client = sdk(api)
    client.api_key = "sekrit-key-1"
    assert client.messages.create(model="fake", max_tokens=5, messages=HI).content
    # The same key works on the OpenAI route too, and ModelsLab's `key` in the body.
    r = api.client.post("/v1/chat/completions", json={"model": "fake", "messages": HI},
                        headers={"x-api-key": "sekrit-key-1"})  # fmt: skip
    assert r.status_code == 200
    body = {"model_id": "fake", "messages": HI, "key": "sekrit-key-1"}
    r = api.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert "key" not in r.headers.get("x-hostler-ignored-params", "")
    r = api.client.post("/v1/chat/completions", json={**body, "key": "wrong"})
    assert r.status_code == 401 and "wrong" not in r.text
    next(gen, None)


def test_models_list_for_both_sdks(api: Api) -> None:
    page = sdk(api).models.list()
    ids = [m.id for m in page]  # stops: has_more is false
    assert "fake" in ids
    first = page.data[0]
    assert first.type == "model" and first.display_name and first.created_at


def test_head_root_and_hello(api: Api) -> None:
    assert api.client.head("/").status_code == 200
    assert api.client.head("/api/hello").status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 10_000}]},
        {"tools": [{**WEATHER, "input_schema": {"type": "object", "description": "x" * 2**20}}]},
        {"tools": [{**WEATHER, "name": f"t{i}"} for i in range(1_000)]},
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "t", "content": _nest}
                        for _nest in [json.loads("[" * 200 + "]" * 200)]
                    ],
                }
            ]
        },
        {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
        {"messages": []},
        {"max_tokens": -1},
        {"stop_sequences": ["x"] * 1000},
    ],
    ids=[
        "10k-blocks",
        "1MB-schema",
        "1000-tools",
        "nested-result",
        "image",
        "empty",
        "neg",
        "stops",
    ],
)
def test_hostile_bodies_are_400_before_any_work(tmp_path: Path, body: dict[str, Any]) -> None:
    gen = make_api(tmp_path, max_body_mb=16)
    api = next(gen)
    full = {"model": "fake", "max_tokens": 10, "messages": HI, **body}
    paths = ["/v1/messages"]
    if "max_tokens" not in body and "stop_sequences" not in body:
        paths.append("/v1/messages/count_tokens")
    for path in paths:
        r = api.client.post(path, json=full)
        assert r.status_code == 400, (path, r.text[:300])
        assert r.json()["type"] == "error"
    assert api.engine.requests == []
    next(gen, None)


def test_deeply_nested_json_is_400(api: Api) -> None:
    r = api.client.post(
        "/v1/messages", content=b'{"model": "fake", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    )
    assert r.status_code in (400, 413) and r.json()["type"] == "error"


def test_also_under_api_v1(api: Api) -> None:
    r = api.client.post("/api/v1/messages", json={"model": "fake", "max_tokens": 5, "messages": HI})
    assert r.status_code == 200 and r.json()["type"] == "message"


def test_prewarm_with_zero_max_tokens(api: Api) -> None:
    m = create(api, False, max_tokens=0)
    assert m.content == [] and m.usage.output_tokens == 0 and m.stop_reason == "max_tokens"


def test_a_stream_waiting_for_its_model_gets_pings(tmp_path: Path) -> None:
    gate = threading.Event()
    with slow_model_app(tmp_path, gate) as client:
        body = {"model": "other", "max_tokens": 50, "messages": HI, "stream": True}
        threading.Timer(0.5, gate.set).start()
        with client.stream("POST", "/v1/messages", json=body) as r:
            assert r.status_code == 200
            raw = r.read().decode()
        assert raw.index("event: ping") < raw.index("event: message_start")
        named = [line for line in raw.splitlines() if line.startswith("event: ")]
        assert [n for n in named if n != "event: ping"][-1] == "event: message_stop"
        assert "[DONE]" not in raw
        # An error found after the load comes as an error event.
        bad = {**body, "model": "other", "messages": [{"role": "user", "content": "x" * 300}]}
        client.post("/v1/models/other/unload")
        with client.stream("POST", "/v1/messages", json=bad) as r:
            raw = r.read().decode()
        if r.status_code == 200:
            assert "event: error" in raw and "prompt is too long" in raw
        else:
            assert r.status_code == 400


def test_engine_failure_mid_stream_is_an_error_event(api: Api) -> None:
    api.engine.fail_at = 3
    full = {"model": "fake", "max_tokens": 100, "messages": HI, "stream": True}
    with api.client.stream("POST", "/v1/messages", json=full) as r:
        raw = r.read().decode().replace("\r\n", "\n")
    assert "event: error" in raw
    error = json.loads(raw.split("event: error\ndata: ", 1)[1].split("\n", 1)[0])
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    with pytest.raises(anthropic.InternalServerError):
        create(api, False)


def test_forbidden_origin_and_rate_limit_in_anthropic_shape(tmp_path: Path) -> None:
    keys = [{"name": "one", "key": "sekrit-key-1", "requests_per_minute": 1}]
    gen = make_api(tmp_path, keys=keys)
    api = next(gen)
    body = {"model": "fake", "max_tokens": 5, "messages": HI}
    headers = {"x-api-key": "sekrit-key-1"}
    r = api.client.post("/v1/messages", json=body, headers={**headers, "origin": "http://evil"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert api.client.post("/v1/messages", json=body, headers=headers).status_code == 200
    r = api.client.post("/v1/messages", json=body, headers=headers)
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    next(gen, None)
