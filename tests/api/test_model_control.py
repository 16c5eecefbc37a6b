"""Models a user can see and control: load, unload, ps, keep_alive, memory budget, pins."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api import create_app
from server.config import load_settings
from tests.api.conftest import MODELS_YAML, Api, make_api, slow_model_app, wait_until_loaded
from tests.api.fake_engine import FakeEngine

GIB = 2**30


def test_load_and_unload_on_request(api: Api) -> None:
    r = api.client.post("/v1/models/other/load")
    assert r.status_code == 200 and r.json()["model"] == "other"
    ps = {m["model"]: m for m in api.client.get("/v1/ps").json()["models"]}
    assert set(ps) == {"fake", "other"}
    assert ps["other"]["slots_busy"] == 0 and ps["other"]["idle_seconds"] >= 0
    r = api.client.post("/v1/models/other/unload")
    assert r.json() == {"model": "other", "was_loaded": True, "loaded": False}
    assert [m["model"] for m in api.client.get("/v1/ps").json()["models"]] == ["fake"]
    r = api.client.post("/v1/models/org/fake/unload")  # an alias names the model
    assert r.json()["model"] == "fake" and r.json()["was_loaded"]


def test_load_errors_name_the_cause(api: Api) -> None:
    r = api.client.post("/v1/models/nope/load")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = api.client.post("/v1/models/absent/load")
    assert r.status_code == 404 and "not downloaded" in r.json()["error"]["message"]


def test_a_busy_model_unloads_once_its_reply_is_done(api: Api) -> None:
    engine = api.engine
    engine.delay = 0.05
    done = threading.Event()

    def chat() -> None:
        api.chat({"max_tokens": 10}, True)
        done.set()

    t = threading.Thread(target=chat)
    t.start()
    deadline = time.monotonic() + 5
    while not engine.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    r = api.client.post("/v1/models/fake/unload")
    assert r.json()["loaded"]  # still answering
    t.join(10)
    assert done.is_set()
    deadline = time.monotonic() + 5
    while api.models.pool.is_loaded("fake") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not api.models.pool.is_loaded("fake")


def test_request_keep_alive_zero_unloads_after_the_reply(api: Api, stream: bool) -> None:
    r, _ = api.chat({"keep_alive": 0}, stream)
    assert r.status_code == 200
    deadline = time.monotonic() + 5
    while api.models.pool.is_loaded("fake") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not api.models.pool.is_loaded("fake")


def test_a_bad_keep_alive_is_a_400(api: Api, stream: bool) -> None:
    r, body = api.chat({"keep_alive": "soon"}, stream)
    assert r.status_code == 400 and body["error"]["param"] == "keep_alive"


def _app(tmp_path: Path, yaml: str, **settings: object) -> Iterator[Api]:
    f = tmp_path / "models.yaml"
    f.write_text(yaml)
    s, models = load_settings({"models_file": f, **settings})
    engines: dict[str, FakeEngine] = {}

    def loader(model_id: str) -> FakeEngine:
        engines[model_id] = FakeEngine()
        return engines[model_id]

    sizes = {"a": 3 * GIB, "b": 3 * GIB, "c": 5 * GIB, "huge": 40 * GIB}
    app = create_app(s, models, loader=loader, check=lambda _m: None, estimate=sizes.__getitem__)
    with TestClient(app, base_url="http://localhost") as client:
        wait_until_loaded(client)
        yield Api(client, engines)


BUDGET_YAML = """
models:
  a: {source: {path: a.gguf}}
  b: {source: {path: b.gguf}, pinned: true}
  c: {source: {path: c.gguf}}
  huge: {source: {path: huge.gguf}}
"""


def _loaded(api: Api) -> set[str]:
    return {m["model"] for m in api.client.get("/v1/ps").json()["models"]}


def test_memory_budget_evicts_idle_models_and_spares_pinned_ones(tmp_path: Path) -> None:
    for api in _app(tmp_path, BUDGET_YAML, max_models=5, memory_budget_gib=8):
        api.client.post("/v1/models/a/load")
        api.client.post("/v1/models/b/load")
        assert _loaded(api) == {"a", "b"}  # 6 GiB of 8
        api.client.post("/v1/models/c/load")  # 5 more: one must go, and b is pinned
        assert _loaded(api) == {"b", "c"}
        r = api.client.post("/v1/models/a/load")  # 3 more: c goes, b stays
        assert r.status_code == 200 and _loaded(api) == {"a", "b"}
        r = api.client.post("/v1/models/huge/load")
        assert r.status_code == 500 or r.status_code == 503
        assert "budget" in r.json()["error"]["message"]
        assert _loaded(api) == {"a", "b"}  # nothing was evicted for a model that cannot fit


def test_model_keep_alive_from_models_yaml(tmp_path: Path) -> None:
    yaml = BUDGET_YAML.replace(
        "a: {source: {path: a.gguf}}", "a: {source: {path: a.gguf}, keep_alive: 0}"
    )
    for api in _app(tmp_path, yaml, max_models=5):
        api.client.post("/v1/models/a/load")
        api.client.post("/v1/models/c/load")
        deadline = time.monotonic() + 5
        while "a" in _loaded(api) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _loaded(api) == {"c"}  # a unloaded once idle; c (no keep_alive) stays


def test_requests_get_503_with_retry_after_while_the_startup_model_loads(
    tmp_path: Path,
) -> None:
    f = tmp_path / "models.yaml"
    f.write_text(MODELS_YAML)
    s, models = load_settings({"models_file": f, "model": "fake"})
    gate = threading.Event()

    def slow_loader(model_id: str) -> FakeEngine:
        gate.wait(10)
        return FakeEngine()

    app = create_app(s, models, loader=slow_loader, check=lambda _m: None)
    with TestClient(app, base_url="http://localhost") as client:
        body = {"model": "fake", "messages": [{"role": "user", "content": "Hi"}]}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 503 and r.headers["retry-after"]
        assert "loading" in r.json()["error"]["message"]
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "loading model"
        assert client.get("/v1/ps").json()["models"][0]["model"] == "fake"
        gate.set()
        wait_until_loaded(client)
        assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_root_says_what_this_is(api: Api) -> None:
    body = api.client.get("/").json()
    assert body["name"] == "hostler" and body["api"]["openai"] == "/v1"


@pytest.fixture
def single(tmp_path: Path) -> Iterator[Api]:
    yield from make_api(tmp_path, max_models=1)


def test_a_stream_waiting_for_its_model_gets_processing_comments(tmp_path: Path) -> None:
    gate = threading.Event()
    with slow_model_app(tmp_path, gate) as client:
        body = {"model": "other", "messages": [{"role": "user", "content": "Hi"}]}
        threading.Timer(0.5, gate.set).start()
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            raw = r.read().decode()
        assert raw.index(": HOSTLER PROCESSING") < raw.index("data: {")
        assert raw.rstrip().endswith("data: [DONE]")
        # Once loaded, nothing waits: no comment before the first chunk.
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            assert r.read().decode().startswith("data: {")
