"""What a router or scraper reads of a replica: /metrics and /v1/loads behind the metrics
key, the gauges under Hostler's and vLLM's names, prompt-cache counters, /health."""

from __future__ import annotations

import re
import time
from pathlib import Path

from tests.api.conftest import Api, make_api

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "A long first message."}]}


def _sample(text: str, name: str, labels: str) -> float:
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    assert m is not None, f"{name}{{{labels}}} not in /metrics"
    return float(m.group(1))


def test_the_metrics_key_reads_metrics_and_loads_only(tmp_path: Path) -> None:
    for api in make_api(tmp_path, api_key="user-secret-1", metrics_key="scraper-secret"):
        scraper = {"Authorization": "Bearer scraper-secret"}
        user = {"Authorization": "Bearer user-secret-1"}
        for path in ("/metrics", "/v1/loads"):
            assert api.client.get(path).status_code == 401, path
            assert api.client.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401
            assert api.client.get(path, headers=scraper).status_code == 200, path
            assert api.client.get(path, headers=user).status_code == 200, path
        r = api.client.post("/v1/chat/completions", json=CHAT, headers=scraper)
        assert r.status_code == 401 and r.json()["error"]["code"] == 401  # not a user's key
        assert api.client.get("/v1/models", headers=scraper).status_code == 401


def test_a_metrics_key_alone_guards_only_the_metrics(tmp_path: Path) -> None:
    for api in make_api(tmp_path, metrics_key="scraper-secret"):
        assert api.client.get("/metrics").status_code == 401
        headers = {"x-api-key": "scraper-secret"}
        assert api.client.get("/metrics", headers=headers).status_code == 200
        assert api.client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_metrics_open_needs_no_key_for_metrics_only(tmp_path: Path) -> None:
    for api in make_api(tmp_path, api_key="user-secret-1", metrics_open=True):
        assert api.client.get("/metrics").status_code == 200
        assert api.client.get("/v1/loads").status_code == 200
        assert api.client.post("/v1/chat/completions", json=CHAT).status_code == 401
        assert api.client.get("/v1/models").status_code == 401


def test_router_gauges_and_prefix_cache_counters(api: Api) -> None:
    first = api.client.post("/v1/chat/completions", json=CHAT).json()
    again = api.client.post("/v1/chat/completions", json=CHAT).json()
    prompt = again["usage"]["prompt_tokens"]
    assert first["usage"]["prompt_tokens"] == prompt
    text = api.client.get("/metrics").text
    assert _sample(text, "hostler_prefix_cache_queries_total", 'model="fake"') == 2 * prompt
    assert _sample(text, "hostler_prefix_cache_hits_total", 'model="fake"') == prompt
    assert _sample(text, "vllm:prefix_cache_hits_total", 'model_name="fake"') == prompt
    for name, labels in (
        ("hostler_kv_cache_usage_ratio", 'model="fake"'),
        ("vllm:kv_cache_usage_perc", 'model_name="fake"'),
        ("vllm:gpu_cache_usage_perc", 'model_name="fake"'),
        ("vllm:num_requests_running", 'model_name="fake"'),
        ("vllm:num_requests_waiting", 'model_name="fake"'),
        ("hostler_queue_depth", 'model="fake"'),
    ):
        assert _sample(text, name, labels) == 0, name  # idle: nothing held, nothing waiting
    assert _sample(text, "hostler_kv_cache_capacity_tokens", 'model="fake"') == 256
    assert "# TYPE vllm:kv_cache_usage_perc gauge" in text

    api.engine.active = 5  # as if five requests were in: four slots busy, one waiting
    text = api.client.get("/metrics").text
    assert _sample(text, "vllm:num_requests_running", 'model_name="fake"') == 4
    assert _sample(text, "vllm:num_requests_waiting", 'model_name="fake"') == 1
    assert _sample(text, "hostler_kv_cache_usage_ratio", 'model="fake"') == 4 * 32 / 256
    load = api.client.get("/v1/loads").json()
    assert load["dp_rank_count"] == 1
    (rank,) = load["loads"]
    assert rank["num_running_reqs"] == 4 and rank["num_waiting_reqs"] == 1
    assert rank["max_total_num_tokens"] == 256 and rank["num_used_tokens"] == 128
    assert rank["token_usage"] == 0.5 and rank["utilization"] == 1.0
    assert rank["cache_hit_rate"] == 0.5
    api.engine.active = 0


def test_health_is_what_a_router_probes(api: Api) -> None:
    assert api.client.get("/health").json()["status"] == "ok"
    api.client.post("/v1/models/fake/unload")
    time.sleep(0.1)
    r = api.client.get("/health")  # nothing loaded: the next request loads it
    assert r.status_code == 200 and r.json()["status"] == "ok"


def _wait(api: Api, status: str, timeout: float = 15.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        r = api.client.get("/health")
        body: dict[str, object] = r.json()
        if body["status"] == status:
            assert r.status_code == (200 if status == "ok" else 503)
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def test_the_default_model_comes_back_by_itself_after_its_engine_died(api: Api) -> None:
    """No request needed: a router that saw 503 sends none, so the replica reloads it."""
    victim = api.engine
    victim.dead = "the engine process died (SIGKILL)"  # type: ignore[attr-defined]
    deadline = time.monotonic() + 15
    while api.engines["fake"] is victim:  # the reaper buries it and loads it again
        assert time.monotonic() < deadline, "the default model was not loaded again"
        time.sleep(0.05)
    body = _wait(api, "ok")
    assert "SIGKILL" in str(body["engine_deaths"]) and victim.closed
    assert api.client.post("/v1/chat/completions", json=CHAT).status_code == 200
