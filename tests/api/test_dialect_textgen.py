"""KoboldCpp, TabbyAPI and text-generation-webui routes, as SillyTavern calls them."""

from __future__ import annotations

import json
from typing import Any

from tests.api.conftest import Api
from tests.api.fake_engine import REPLY

KOBOLD = {
    "prompt": "Hi",
    "max_length": 12,
    "max_context_length": 4096,
    "rep_pen": 1.1,
    "rep_pen_range": 320,
    "temperature": 0.7,
    "top_p": 0.92,
    "top_k": 100,
    "top_a": 0,
    "typical": 1,
    "tfs": 1,
    "sampler_order": [6, 0, 1, 3, 4, 2, 5],
    "stop_sequence": ["friend"],
    "genkey": "KCPP1234",
}


def test_kobold_info_routes(api: Api) -> None:
    assert api.client.get("/api/v1/model").json() == {"result": "koboldcpp/fake"}
    assert api.client.get("/api/extra/version").json()["result"] == "KoboldCpp"
    n_ctx = api.engine.info.n_ctx
    assert api.client.get("/api/extra/true_max_context_length").json() == {"value": n_ctx}
    assert api.client.get("/api/v1/config/max_context_length").json() == {"value": n_ctx}
    r = api.client.post("/api/extra/tokencount", json={"prompt": "Hi"})
    assert r.json() == {"value": 2, "ids": [72, 105]}
    assert api.client.post("/api/extra/abort", json={"genkey": "none"}).json() == {"success": False}


def test_kobold_generate(api: Api) -> None:
    r = api.client.post("/api/v1/generate", json=KOBOLD)
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert result["text"] == REPLY[:12] and result["finish_reason"] == "length"
    req = api.engine.requests[-1]
    assert req.max_tokens == 12 and req.params.penalty_last_n == 256  # clamped to n_ctx
    assert req.params.sampler_order == (
        "top_k",
        "top_a",
        "tfs",
        "typical_p",
        "top_p",
        "temperature",
    )
    assert "tfs" not in r.headers.get("x-hostler-ignored-params", "")


def test_kobold_stream(api: Api) -> None:
    body = {**KOBOLD, "max_length": 100}
    with api.client.stream("POST", "/api/extra/generate/stream", json=body) as r:
        raw = r.read().decode()
    assert "event: message" in raw and "[DONE]" not in raw
    events = [json.loads(x[6:]) for x in raw.splitlines() if x.startswith("data: ")]
    assert "".join(e["token"] for e in events) == "Hello there, "
    assert events[-1]["finish_reason"] == "stop"


def test_kobold_abort_by_genkey(api: Api) -> None:
    api.engine.delay = 0.05
    events = []
    with api.client.stream("POST", "/api/extra/generate/stream", json=KOBOLD) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if len(events) == 1:
                    ok = api.client.post("/api/extra/abort", json={"genkey": "KCPP1234"})
                    assert ok.json() == {"success": True}
    assert api.engine.handles[-1].cancelled  # the engine was told to stop it


def test_tabby_routes(api: Api) -> None:
    ids = [m["id"] for m in api.client.get("/v1/model/list").json()["data"]]
    assert "fake" in ids
    model = api.client.get("/v1/model").json()
    assert model["id"] == "fake" and model["parameters"]["max_seq_len"] == api.engine.info.n_ctx
    r = api.client.post("/v1/token/encode", json={"text": "Hi"})
    assert r.json() == {"tokens": [72, 105], "length": 2}
    assert api.client.post("/v1/token/decode", json={"tokens": [72, 105]}).json() == {"text": "Hi"}


def test_ooba_routes(api: Api) -> None:
    assert api.client.get("/v1/internal/model/info").json()["model_name"] == "fake"
    r = api.client.post("/v1/internal/encode", json={"text": "Hi"})
    assert r.json() == {"tokens": [72, 105], "length": 2}
    assert api.client.post("/v1/internal/token-count", json={"text": "Hi"}).json() == {"length": 2}
    assert api.client.post("/v1/internal/decode", json={"tokens": [72]}).json() == {"text": "H"}


def test_kobold_abort_is_per_key(tmp_path: Any) -> None:
    from tests.api.conftest import make_api

    keys = [{"name": "a", "key": "key-of-a-123"}, {"name": "b", "key": "key-of-b-123"}]
    for api in make_api(tmp_path, keys=keys):
        api.engine.delay = 0.05
        a = {"Authorization": "Bearer key-of-a-123"}
        b = {"Authorization": "Bearer key-of-b-123"}
        with api.client.stream("POST", "/api/extra/generate/stream", json=KOBOLD, headers=a) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    other = api.client.post(
                        "/api/extra/abort", json={"genkey": "KCPP1234"}, headers=b
                    )
                    assert other.json() == {"success": False}
                    own = api.client.post(
                        "/api/extra/abort", json={"genkey": "KCPP1234"}, headers=a
                    )
                    assert own.json() == {"success": True}
                    break
