"""Reasoning on the real engine: SmolLM2 made to think by a grammar, on every route."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import pytest

pytestmark = pytest.mark.e2e

# SmolLM2 does not think; this grammar makes it write `<think>…</think>answer`.
THINKING = 'root ::= "<think>" [a-z ]{3,40} "</think>" [A-Za-z ]{2,30}'
ASK = [{"role": "user", "content": "Say hello."}]
BASE: dict[str, Any] = {"model": "smollm2-135m", "temperature": 0, "grammar": THINKING}


def _chat(url: str, body: dict[str, Any], stream: bool) -> tuple[str, str]:
    full = {**BASE, "messages": ASK, "max_tokens": 80, **body}
    if not stream:
        r = httpx.post(url + "/v1/chat/completions", json=full, timeout=120)
        assert r.status_code == 200, r.text
        m = r.json()["choices"][0]["message"]
        assert m.get("reasoning") == m.get("reasoning_content")
        return m["content"], m.get("reasoning") or ""
    content = reasoning = ""
    with httpx.stream("POST", url + "/v1/chat/completions", json={**full, "stream": True},
                      timeout=120) as r:  # fmt: skip
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    content += c["delta"].get("content") or ""
                    reasoning += c["delta"].get("reasoning") or ""
    return content, reasoning


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_chat_splits_thinking(server_url: str, stream: bool) -> None:
    content, reasoning = _chat(server_url, {}, stream)
    assert reasoning and "<think>" not in content and "</think>" not in content
    assert content.strip()
    assert (content, reasoning) == _chat(server_url, {}, not stream)


def test_thinking_budget_closes_the_thought(server_url: str) -> None:
    grammar = 'root ::= "<think>" [a-z ]{3,200} "</think>" [A-Za-z ]{2,30}'
    body = {"grammar": grammar, "reasoning": {"max_tokens": 4}, "max_tokens": 120}
    content, reasoning = _chat(server_url, body, stream=False)
    _, free = _chat(server_url, {"grammar": grammar, "max_tokens": 120}, stream=False)
    assert len(reasoning) < len(free)  # cut short by the budget
    assert len(reasoning.split()) <= 8 and content.strip()


def test_text_completion_keeps_the_tags(server_url: str) -> None:
    body = {**BASE, "prompt": "Say hello.", "max_tokens": 60}
    r = httpx.post(server_url + "/v1/completions", json=body, timeout=120)
    assert r.json()["choices"][0]["text"].startswith("<think>")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_anthropic_thinking_blocks(server_url: str, stream: bool) -> None:
    body: dict[str, Any] = {"model": "smollm2-135m", "max_tokens": 80, "messages": ASK,
                            "extra_body": {"temperature": 0, "grammar": THINKING}}  # fmt: skip
    with anthropic.Anthropic(
        base_url=server_url, api_key="x", max_retries=0, timeout=120
    ) as claude:
        if stream:
            with claude.messages.stream(**body) as s:
                m = s.get_final_message()
        else:
            m = claude.messages.create(**body)
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.content[0].thinking and m.content[0].signature  # type: ignore[union-attr]
    assert "<think>" not in m.content[1].text  # type: ignore[union-attr]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_ollama_thinking(server_url: str, stream: bool) -> None:
    body = {"model": "smollm2-135m", "messages": ASK, "stream": stream,
            "options": {"temperature": 0, "grammar": THINKING, "num_predict": 80}}  # fmt: skip
    r = httpx.post(server_url + "/api/chat", json=body, timeout=120)
    lines = [json.loads(x) for x in r.text.splitlines() if x.strip()]
    thinking = "".join(x["message"].get("thinking", "") for x in lines)
    content = "".join(x["message"]["content"] for x in lines)
    assert thinking and content.strip() and "<think>" not in content
