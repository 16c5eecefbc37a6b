"""Each frontend dialect against the real engine: text arrives, stops hold, counts match."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.e2e

PROMPT = "<|im_start|>user\nCount from one to ten in words.<|im_end|>\n<|im_start|>assistant\n"


def _post(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _lines(url: str, path: str, body: dict[str, Any]) -> list[str]:
    with httpx.stream("POST", url + path, json=body, timeout=120) as r:
        assert r.status_code == 200
        return [line for line in r.iter_lines() if line]


def test_llamacpp_completion_streamed_and_not(server_url: str) -> None:
    body = {"prompt": PROMPT, "n_predict": 40, "temperature": 0, "stop": ["five"]}
    plain = _post(server_url, "/completion", body)
    assert plain["content"] and "five" not in plain["content"]
    assert plain["stop_type"] in ("eos", "word", "limit")
    events = [
        json.loads(x[6:])
        for x in _lines(server_url, "/completion", {**body, "stream": True})
        if x.startswith("data: {")
    ]
    assert "".join(e["content"] for e in events) == plain["content"]
    assert events[-1]["stop"] is True and events[-1]["tokens_evaluated"] > 0


def test_token_counts_match_our_tokenizer(server_url: str) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    ids = _post(server_url, "/tokenize", {"content": text})["tokens"]
    assert _post(server_url, "/v1/token/encode", {"text": text})["tokens"] == ids
    assert _post(server_url, "/v1/internal/encode", {"text": text})["length"] == len(ids)
    assert _post(server_url, "/api/extra/tokencount", {"prompt": text})["value"] == len(ids)
    assert _post(server_url, "/detokenize", {"tokens": ids})["content"].strip() == text
    usage = _post(
        server_url, "/v1/completions", {"model": "smollm2-135m", "prompt": text, "max_tokens": 1}
    )["usage"]
    assert usage["prompt_tokens"] == len(ids)


def test_kobold_generate_and_stream(server_url: str) -> None:
    body = {"prompt": PROMPT, "max_length": 16, "temperature": 0, "rep_pen": 1.0,
            "sampler_order": [6, 0, 1, 3, 4, 2, 5], "stop_sequence": ["five"]}  # fmt: skip
    text = _post(server_url, "/api/v1/generate", body)["results"][0]["text"]
    assert text and "five" not in text
    tokens = [
        json.loads(x[6:])["token"]
        for x in _lines(server_url, "/api/extra/generate/stream", body)
        if x.startswith("data: ")
    ]
    assert "".join(tokens) == text


def test_sillytavern_text_completion_body(server_url: str) -> None:
    body = {
        "prompt": PROMPT, "model": "smollm2-135m", "max_new_tokens": 12, "max_tokens": 12,
        "temperature": 0.7, "rep_pen": 1.1, "rep_pen_range": 0, "sampler_seed": -1,
        "dry_sequence_breakers": '["\\n", ":", "\\"", "*"]', "sampler_order": [6, 0, 1, 3, 4, 2, 5],
        "stopping_strings": ["\nUser:"], "stop": ["\nUser:"], "tfs": 1, "top_a": 0,
        "custom_token_bans": "", "banned_strings": [], "truncation_length": 8192,
    }  # fmt: skip
    data = _post(server_url, "/v1/completions", body)
    assert data["choices"][0]["text"] and data["usage"]["completion_tokens"] <= 12


def test_openrouter_prompt_on_chat(server_url: str) -> None:
    body = {"model": "smollm2-135m", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    data = _post(server_url, "/api/v1/chat/completions", body)
    assert data["object"] == "chat.completion" and data["choices"][0]["text"]


def test_ollama_chat_and_generate(server_url: str) -> None:
    msgs = [{"role": "user", "content": "Count from one to ten in words."}]
    body = {
        "model": "smollm2-135m",
        "messages": msgs,
        "options": {"num_predict": 10, "temperature": 0},
    }
    lines = [json.loads(x) for x in _lines(server_url, "/api/chat", body)]
    text = "".join(x["message"]["content"] for x in lines)
    assert text and lines[-1]["done"] and lines[-1]["eval_count"] == 10
    plain = _post(server_url, "/api/chat", {**body, "stream": False})
    assert plain["message"]["content"] == text
    gen = _post(server_url, "/api/generate", {"model": "smollm2-135m", "prompt": PROMPT,
                                              "raw": True, "stream": False,
                                              "options": {"num_predict": 5}})  # fmt: skip
    assert gen["response"] and gen["done_reason"] == "length"
    assert [m["name"] for m in httpx.get(server_url + "/api/tags").json()["models"]]
