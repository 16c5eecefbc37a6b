"""One real `hostler serve` process on SmolLM2-135M for the whole e2e session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A `hostler serve` subprocess on SmolLM2, on a free loopback port."""

    def __init__(self, log: Path, *args: str, model: str = "smollm2-135m") -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [
            sys.executable, "-m", "server", "serve", "--model", model,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--models-file", str(ROOT / "models.yaml"), *args,
        ]  # fmt: skip
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ
            )
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited early:\n" + log.read_text())
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("server did not start:\n" + log.read_text())
            time.sleep(0.3)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit code (killed, and an error, past `timeout`)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def openai(self) -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("server")
    server = Server(
        folder / "server.log",
        "--slots", "4", "--max-queue", "8", "--shutdown-grace", "5",
        "--cache-dir", str(folder / "cache"),
    )  # fmt: skip
    try:
        yield server.url
    finally:
        code = server.stop(timeout=30)
        assert code == 0, server.log.read_text()[-3000:]


@pytest.fixture
def client(server_url: str) -> Iterator[OpenAI]:
    with OpenAI(base_url=server_url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c
