"""The status page's routes: the page for browsers, its files, the snapshot and feed
behind the key, and pulls with progress (the page itself is tested in a browser:
tests/e2e/test_status_page.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api import create_app
from server.config import load_settings
from tests.api.conftest import Api, make_api, wait_until_loaded
from tests.api.fake_engine import FakeEngine
from tests.fakehub import hub_environment

BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[Api]:
    yield from make_api(tmp_path, api_key="sekrit")


def test_browsers_get_the_page_and_clients_the_json(api: Api) -> None:
    page = api.client.get("/", headers=BROWSER)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<script src="/ui/status.js"' in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    body = api.client.get("/").json()  # curl, SDKs: */*
    assert body["name"] == "hostler" and body["status"] == "/status"
    assert api.client.get("/", headers={"Accept": "application/json"}).json() == body


def test_only_the_pages_own_files_are_served(api: Api) -> None:
    js = api.client.get("/ui/status.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert api.client.get("/ui/status.css").headers["content-type"].startswith("text/css")
    assert api.client.get("/ui/favicon.svg").status_code == 200
    for name in ("status.html", "nope.js", "..%2Fstatus.py", "%2e%2e%2f__init__.py"):
        r = api.client.get(f"/ui/{name}")
        assert r.status_code == 404, name
        assert r.json()["error"]["type"] == "not_found_error"


def test_snapshot_shows_models_slots_and_requests_but_no_text(api: Api) -> None:
    secret = "zebra-crossing-4711"
    r, _ = api.chat({"messages": [{"role": "user", "content": secret}]}, stream=False)
    assert r.status_code == 200
    api.client.app.state.status.tick()  # type: ignore[attr-defined]
    snap = api.client.get("/status").json()
    models = {m["id"]: m for m in snap["models"]}
    assert models["fake"]["state"] == "loaded"
    assert models["fake"]["slots"] == 4 and models["fake"]["context"] == 256
    assert models["absent"]["state"] == "not downloaded"
    assert snap["server"]["key_required"] is False
    assert snap["totals"]["slots"] == 4
    assert len(snap["series"]) == 1
    (req,) = snap["requests"]
    assert req["route"] == "/v1/chat/completions" and req["model"] == "fake"
    assert req["prompt_tokens"] > 0 and req["completion_tokens"] > 0
    assert req["status"] == "stop" and req["ttft_ms"] is not None
    text = json.dumps(snap)
    assert secret not in text and api.engine.reply not in text


def test_failed_model_shows_its_reason(api: Api) -> None:
    assert api.client.post("/v1/models/broken/load").status_code >= 400
    api.models.pool.failed["broken"] = "cannot load broken"
    snap = api.client.get("/status").json()
    broken = next(m for m in snap["models"] if m["id"] == "broken")
    assert broken["state"] == "failed" and "cannot load broken" in broken["error"]


def test_data_needs_the_key_the_page_does_not(keyed: Api) -> None:
    c = keyed.client
    assert c.get("/", headers=BROWSER).status_code == 200
    assert c.get("/ui/status.js").status_code == 200
    for path in ("/status", "/status/events"):
        r = c.get(path)
        assert r.status_code == 401, path
        assert r.json()["error"]["type"] == "authentication_error"
    ok = c.get("/status", headers={"Authorization": "Bearer sekrit"})
    assert ok.status_code == 200 and ok.json()["server"]["key_required"] is True
    assert c.post("/v1/models/fake/unload").status_code == 401


def test_feeds_are_bounded(api: Api) -> None:
    board = api.client.app.state.status  # type: ignore[attr-defined]
    board.max_feeds = 2
    a, b = board.open_feed(), board.open_feed()
    r = api.client.get("/status/events")
    assert r.status_code == 429 and r.headers["retry-after"] == "5"
    assert "status pages are open" in r.json()["error"]["message"]
    board.close_feed(a)
    board.close_feed(b)
    assert api.client.get("/status").json()["server"]["status_pages"] == 0


def test_host_and_origin_rules_hold_for_the_page(tmp_path: Path) -> None:
    for app in make_api(tmp_path, allowed_hosts=["localhost"]):
        assert app.client.get("/", headers={**BROWSER, "Host": "evil.example"}).status_code == 400
        r = app.client.get("/status", headers={"Origin": "http://evil.example"})
        assert r.status_code == 403


# -- pulls ---------------------------------------------------------------------------------

HUB_YAML = """
models:
  fake:
    source: {type: path, path: fake.gguf}
  hubbed:
    source: {type: huggingface, repo: org/repo, file: m.gguf}
  missing:
    source: {type: huggingface, repo: org/repo, file: gone.gguf}
"""
DATA = b"GGUF" + bytes(range(256)) * 512


@pytest.fixture
def hub_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    with hub_environment(tmp_path, monkeypatch, {"org/repo/m.gguf": DATA}):
        f = tmp_path / "models.yaml"
        f.write_text(HUB_YAML)
        settings, models = load_settings({"models_file": f, "model": "fake"})
        app = create_app(settings, models, loader=lambda _m: FakeEngine(), check=lambda _m: None)
        with TestClient(app, base_url="http://localhost") as client:
            wait_until_loaded(client)
            yield client


def _until(client: TestClient, model: str, state: str) -> dict[str, object]:
    deadline = time.monotonic() + 20
    while True:
        entry = next(m for m in client.get("/status").json()["models"] if m["id"] == model)
        if entry["state"] == state and (entry["download"] or {}).get("state") != "downloading":
            return dict(entry)
        assert time.monotonic() < deadline, entry
        time.sleep(0.05)


def test_pull_downloads_with_progress(hub_app: TestClient) -> None:
    before = next(m for m in hub_app.get("/status").json()["models"] if m["id"] == "hubbed")
    assert before["state"] == "not downloaded"
    r = hub_app.post("/v1/models/hubbed/pull")
    assert r.status_code == 202 and r.json()["state"] == "downloading"
    entry = _until(hub_app, "hubbed", "downloaded")
    download = entry["download"]
    assert isinstance(download, dict)
    assert download["state"] == "done"
    assert download["done_bytes"] == download["total_bytes"] == len(DATA)
    again = hub_app.post("/v1/models/hubbed/pull")
    assert again.status_code == 200 and again.json()["downloaded"] is True


def test_failed_pull_says_why(hub_app: TestClient) -> None:
    assert hub_app.post("/v1/models/missing/pull").status_code == 202
    entry = _until(hub_app, "missing", "not downloaded")
    download = entry["download"]
    assert isinstance(download, dict)
    assert download["state"] == "failed" and "404" in str(download["error"])


def test_pull_of_an_unknown_model_is_404(hub_app: TestClient) -> None:
    r = hub_app.post("/v1/models/nope/pull")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
