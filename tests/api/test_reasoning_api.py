"""The reasoning channel on the OpenAI/OpenRouter and Ollama routes (fake engine)."""

from __future__ import annotations

import json
from typing import Any

from tests.api.conftest import Api

THOUGHT = "<think>I should greet.</think>\n\nHello!"
HI = [{"role": "user", "content": "Hi"}]


def chat_stream(api: Api, body: dict[str, Any]) -> tuple[str, str, str]:
    """(content, reasoning, reasoning_content) folded from a chat stream."""
    full = {"model": "fake", "messages": HI, "stream": True, **body}
    content = reasoning = reasoning_content = ""
    with api.client.stream("POST", "/v1/chat/completions", json=full) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for c in json.loads(line[6:]).get("choices", []):
                d = c["delta"]
                content += d.get("content") or ""
                reasoning += d.get("reasoning") or ""
                reasoning_content += d.get("reasoning_content") or ""
    return content, reasoning, reasoning_content


def test_reasoning_split_on_chat(api: Api, stream: bool) -> None:
    api.engine.reply = THOUGHT
    if stream:
        assert chat_stream(api, {}) == ("Hello!", "I should greet.", "I should greet.")
        return
    r = api.client.post("/v1/chat/completions", json={"model": "fake", "messages": HI})
    message = r.json()["choices"][0]["message"]
    assert message["content"] == "Hello!"
    assert message["reasoning"] == message["reasoning_content"] == "I should greet."


def test_exclude_and_include_reasoning(api: Api, stream: bool) -> None:
    api.engine.reply = THOUGHT
    for extra in ({"reasoning": {"exclude": True}}, {"include_reasoning": False}):
        if stream:
            assert chat_stream(api, extra) == ("Hello!", "", "")
            continue
        body = {"model": "fake", "messages": HI, **extra}
        message = api.client.post("/v1/chat/completions", json=body).json()["choices"][0]
        assert message["message"]["content"] == "Hello!"
        assert "reasoning" not in message["message"]


def test_reasoning_budget_reaches_the_engine(api: Api) -> None:
    api.engine.reply = THOUGHT
    cases: list[tuple[dict[str, Any], int | None]] = [
        ({"reasoning": {"max_tokens": 64}}, 64),
        ({"reasoning": {"effort": "low"}, "max_tokens": 100}, 20),
        ({"reasoning_effort": "medium", "max_tokens": 100}, 50),
        ({"reasoning": {"enabled": False}}, 0),
        ({"chat_template_kwargs": {"enable_thinking": False}}, 0),
        ({}, None),
    ]
    for extra, tokens in cases:
        body = {"model": "fake", "messages": HI, **extra}
        assert api.client.post("/v1/chat/completions", json=body).status_code == 200
        budget = api.engine.requests[-1].thinking
        assert (budget.tokens if budget else None) == tokens, extra
        if budget is not None:
            assert budget.close_tag == "</think>" and budget.close_ids


def test_plain_reply_is_untouched(api: Api, stream: bool) -> None:
    api.engine.reply = "No thoughts, <think> only words."
    if stream:
        assert chat_stream(api, {})[0] == "No thoughts, <think> only words."
        return
    r = api.client.post("/v1/chat/completions", json={"model": "fake", "messages": HI})
    assert r.json()["choices"][0]["message"]["content"] == "No thoughts, <think> only words."
    assert "reasoning" not in r.json()["choices"][0]["message"]


def test_text_completions_keep_the_tags(api: Api) -> None:
    api.engine.reply = THOUGHT
    r = api.client.post("/v1/completions", json={"model": "fake", "prompt": "Hi"})
    assert r.json()["choices"][0]["text"] == THOUGHT


def test_history_reasoning_is_accepted(api: Api) -> None:
    msgs = [*HI, {"role": "assistant", "content": "Hello", "reasoning": "hmm"}, *HI]
    r = api.client.post("/v1/chat/completions", json={"model": "fake", "messages": msgs})
    assert r.status_code == 200


def test_ollama_thinking(api: Api, stream: bool) -> None:
    api.engine.reply = THOUGHT
    body = {"model": "fake", "messages": HI, "stream": stream}
    r = api.client.post("/api/chat", json=body)
    if stream:
        lines = [json.loads(x) for x in r.text.splitlines() if x]
        thinking = "".join(x["message"].get("thinking", "") for x in lines)
        content = "".join(x["message"]["content"] for x in lines)
    else:
        thinking, content = r.json()["message"]["thinking"], r.json()["message"]["content"]
    assert (thinking, content) == ("I should greet.", "Hello!")
    r = api.client.post("/api/chat", json={**body, "think": False})
    assert "I should greet." not in r.text
    assert api.engine.requests[-1].thinking is not None
    assert api.engine.requests[-1].thinking.tokens == 0


def test_hostile_reasoning_fields_are_400(api: Api) -> None:
    bad: list[dict[str, Any]] = [
        {"reasoning": {"max_tokens": 10**12}},
        {"reasoning": {"max_tokens": -1}},
        {"reasoning": {"effort": "maximum"}},
        {"reasoning_effort": 5},
        {"chat_template_kwargs": {f"k{i}": i for i in range(1000)}},
        {"chat_template_kwargs": {"enable_thinking": {"nested": [1, 2, 3]}}},
        {"include_reasoning": "sometimes"},
    ]
    for extra in bad:
        r = api.client.post("/v1/chat/completions", json={"model": "fake", "messages": HI, **extra})
        assert r.status_code == 400, extra
    r = api.client.post(
        "/v1/messages",
        json={"model": "fake", "max_tokens": 5, "messages": HI,
              "thinking": {"type": "enabled", "budget_tokens": -5}},
    )  # fmt: skip
    assert r.status_code == 400 and r.json()["type"] == "error"
    r = api.client.post(
        "/v1/messages",
        json={"model": "fake", "max_tokens": 5, "messages": HI, "thinking": {"type": "sometimes"}},
    )
    assert r.status_code == 400
    assert api.engine.requests == []
