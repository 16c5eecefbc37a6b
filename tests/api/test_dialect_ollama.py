"""Ollama's API as Open WebUI and Ollama's own clients use it."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.api.conftest import Api
from tests.api.fake_engine import REPLY


def _lines(api: Api, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with api.client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        raw = r.read().decode()
    return [json.loads(line) for line in raw.splitlines() if line]


def test_chat_streams_ndjson_by_default(api: Api) -> None:
    body = {"model": "fake", "messages": [{"role": "user", "content": "Hi"}]}
    lines = _lines(api, "/api/chat", body)
    assert "".join(x["message"]["content"] for x in lines) == REPLY
    assert [x["done"] for x in lines].count(True) == 1 and lines[-1]["done"]
    assert lines[-1]["done_reason"] == "stop" and lines[-1]["eval_count"] > 0
    text = "".join(chr(t) for t in api.engine.requests[-1].prompt_tokens[1:])
    assert text.startswith("<|im_start|>user\nHi")  # the model's template was applied


def test_chat_options_and_format(api: Api) -> None:
    body = {
        "model": "fake",
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": False,
        "format": "json",
        "keep_alive": -1,
        "options": {"num_predict": 5, "repeat_penalty": 1.2, "top_k": 20, "num_ctx": 4096},
    }
    r = api.client.post("/api/chat", json=body)
    data = r.json()
    assert data["message"] == {"role": "assistant", "content": REPLY[:5]}
    assert data["done_reason"] == "length"
    req = api.engine.requests[-1]
    assert req.max_tokens == 5 and req.params.top_k == 20 and req.params.grammar
    ignored = r.headers["x-hostler-ignored-params"].split(",")
    assert "num_ctx" in ignored and "keep_alive" not in ignored


@pytest.mark.parametrize("raw", [False, True])
def test_generate(api: Api, raw: bool) -> None:
    body = {"model": "fake", "prompt": "Hi", "raw": raw, "stream": False, "system": "Be kind."}
    data = api.client.post("/api/generate", json=body).json()
    assert data["response"] == REPLY and data["done"] is True
    text = "".join(chr(t) for t in api.engine.requests[-1].prompt_tokens[1:])
    assert (text == "Hi") is raw
    lines = _lines(api, "/api/generate", {**body, "stream": True})
    assert "".join(x["response"] for x in lines) == REPLY


def test_empty_requests_load_the_model(api: Api) -> None:
    data = api.client.post("/api/generate", json={"model": "fake"}).json()
    assert data["done_reason"] == "load" and not api.engine.requests
    data = api.client.post("/api/chat", json={"model": "fake", "messages": []}).json()
    assert data["done_reason"] == "load"


def test_info_routes(api: Api) -> None:
    assert api.client.get("/api/version").json()["version"]
    loaded = api.client.get("/api/ps").json()["models"]
    assert [m["name"] for m in loaded] == ["fake"] and loaded[0]["context_length"] == 256
    show = api.client.post("/api/show", json={"model": "fake"}).json()
    assert show["template"] and any(k.endswith(".context_length") for k in show["model_info"])
    assert api.client.post("/api/show", json={"model": "nope"}).status_code == 404
    assert api.client.get("/api/tags").status_code == 200  # fake files are not on disk


def test_images_are_refused(api: Api) -> None:
    body = {"model": "fake", "messages": [{"role": "user", "content": "x", "images": ["AAAA"]}]}
    r = api.client.post("/api/chat", json=body)
    assert r.status_code == 400 and "images" in r.json()["error"]  # Ollama: a string


def test_any_content_type_as_ollama_accepts(api: Api) -> None:
    raw = json.dumps({"model": "fake", "prompt": "Hi", "stream": False})
    r = api.client.post(
        "/api/generate", content=raw, headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert r.status_code == 200 and r.json()["response"] == REPLY
    r = api.client.post("/api/generate", content=raw, headers={"origin": "https://evil.example"})
    assert r.status_code == 403


def test_keep_alive(api: Api) -> None:
    from server.api.dialects.ollama import keep_alive_seconds

    assert keep_alive_seconds("5m") == 300 and keep_alive_seconds("1h30m") == 5400
    assert keep_alive_seconds(-1) == -1 and keep_alive_seconds("-1") == -1
    body = {"model": "fake", "messages": [{"role": "user", "content": "Hi"}], "stream": False}
    r = api.client.post("/api/chat", json={**body, "keep_alive": "soon"})
    assert r.status_code == 400 and "keep_alive" in r.json()["error"]  # Ollama: a string
    engine = api.engine
    assert api.client.post("/api/chat", json={**body, "keep_alive": 0}).status_code == 200
    deadline = time.monotonic() + 5
    while api.client.get("/api/ps").json()["models"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert api.client.get("/api/ps").json()["models"] == [] and engine.closed
    assert api.client.post("/api/chat", json={**body, "keep_alive": -1}).status_code == 200
    time.sleep(1.5)
    assert [m["name"] for m in api.client.get("/api/ps").json()["models"]] == ["fake"]
