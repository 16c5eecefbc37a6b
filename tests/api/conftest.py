from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from server.api import create_app
from server.config import load_settings
from server.errors import ModelLoadError, ModelNotFoundError
from server.protocol.chat import ChatCompletionChunk
from tests.api.fake_engine import FakeEngine

MODELS_YAML = """
models:
  fake:
    source: {type: path, path: fake.gguf}
    template: chatml
    context: 256
    aliases: [org/fake]
    defaults: {temperature: 0.7}
  other:
    source: {type: path, path: other.gguf}
    defaults: {temperature: 0.5, top_p: 0.9}
    presets:
      creative: {temperature: 1.2, min_p: 0.1}
    force: {top_k: 40}
    strip: [repetition_penalty]
    banned_strings: ["shivers down", {regex: '\\bsmirk\\w*'}]
  broken:
    source: {type: path, path: broken.gguf}
  absent:
    source: {type: path, path: absent.gguf}
"""


class Api:
    """The app in-process, with helpers that run a chat request streamed or not."""

    def __init__(self, client: TestClient, engines: dict[str, FakeEngine]) -> None:
        self.client = client
        self.engines = engines

    @property
    def models(self) -> Any:
        """The app's ModelService."""
        return self.client.app.state.models  # type: ignore[attr-defined]

    @property
    def engine(self) -> FakeEngine:
        return self.engines["fake"]

    def chat(
        self, body: dict[str, Any], stream: bool, **kw: Any
    ) -> tuple[httpx.Response, dict[str, Any]]:
        """POST a chat request; return the response and the assembled result."""
        body = {"model": "fake", "messages": [{"role": "user", "content": "Hi"}], **body}
        if not stream:
            r = self.client.post("/v1/chat/completions", json=body, **kw)
            return r, r.json()
        body["stream"] = True
        with self.client.stream("POST", "/v1/chat/completions", json=body, **kw) as r:
            raw = r.read().decode()
        if r.status_code != 200:
            return r, json.loads(raw)
        return r, assemble(raw)


def assemble(raw: str) -> dict[str, Any]:
    """Fold SSE chunks into the shape of a non-streamed response."""
    texts: dict[int, str] = {}
    calls: dict[int, list[dict[str, Any]]] = {}
    finish: dict[int, str | None] = {}
    usage = None
    error = None
    model = None
    done = False
    for line in raw.splitlines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            error = chunk["error"]
            continue
        ChatCompletionChunk.model_validate(chunk)  # chunks are built as dicts: check the shape
        model = chunk["model"]
        usage = chunk.get("usage") or usage
        for c in chunk["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + (c["delta"].get("content") or "")
            for call in c["delta"].get("tool_calls") or []:
                calls.setdefault(c["index"], []).append(
                    {k: v for k, v in call.items() if k != "index"}
                )
            if c.get("finish_reason"):
                finish[c["index"]] = c["finish_reason"]
    out: dict[str, Any] = {
        "model": model,
        "done": done,
        "choices": [
            {
                "index": i,
                "message": {"content": texts[i] or None, "tool_calls": calls.get(i)},
                "finish_reason": finish.get(i),
            }
            for i in sorted(texts)
        ],
        "usage": usage,
    }
    if error:
        out["error"] = error
    return out


def make_api(tmp_path: Path, **overrides: Any) -> Iterator[Api]:
    f = tmp_path / "models.yaml"
    f.write_text(MODELS_YAML)
    settings, models = load_settings({"models_file": f, "model": "fake", **overrides})
    engines: dict[str, FakeEngine] = {}

    def loader(model_id: str) -> FakeEngine:
        if model_id == "broken":
            raise ModelLoadError("cannot load broken")
        engines[model_id] = FakeEngine()
        return engines[model_id]

    def check(model_id: str) -> None:
        if model_id == "absent":
            raise ModelNotFoundError("model 'absent' is not downloaded", param="model")

    app = create_app(settings, models, loader=loader, check=check)
    with TestClient(app, base_url="http://localhost") as client:
        wait_until_loaded(client)
        yield Api(client, engines)


@contextmanager
def slow_model_app(tmp_path: Path, gate: threading.Event) -> Iterator[TestClient]:
    """An app whose model `other` (downloaded, not loaded) loads only once `gate` is set;
    keep-alive comments or pings every 0.1 s."""
    f = tmp_path / "models.yaml"
    f.write_text(MODELS_YAML)
    (tmp_path / "other.gguf").write_bytes(b"GGUF")  # downloaded, so it can load
    s, models = load_settings({"models_file": f, "model": "fake", "keepalive": 0.1})

    def loader(model_id: str) -> FakeEngine:
        if model_id == "other":
            gate.wait(10)
        return FakeEngine()

    app = create_app(s, models, loader=loader, check=lambda _m: None)
    with TestClient(app, base_url="http://localhost") as client:
        wait_until_loaded(client)
        yield client


def wait_until_loaded(client: TestClient, timeout: float = 10.0) -> None:
    """The start-up model loads in the background (503 meanwhile): wait for it."""
    deadline = time.monotonic() + timeout
    while client.app.state.models.starting is not None:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the start-up model did not load"
        time.sleep(0.01)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from make_api(tmp_path, max_models=3)


@pytest.fixture(params=[False, True], ids=["json", "stream"])
def stream(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)
