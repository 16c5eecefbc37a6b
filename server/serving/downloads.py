"""Model downloads started from the API (the status page's pull button, and the model a
server starts with), with their progress: bytes, rate and time left.

One download per model at a time: a second pull of a model being fetched joins the
first. The transfer runs in a thread (huggingface_hub's client blocks); its progress is
written there and read by the status feed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from server.errors import DownloadError, HostlerError
from server.registry import ModelSpec, Registry, download, local_file

log = logging.getLogger("hostler.downloads")

# The rate is measured over the last few seconds, so that a stall shows quickly.
RATE_WINDOW = 5.0

Fetch = Callable[..., Path]


@dataclass
class Pull:
    """One model's download, as the status page shows it."""

    model: str
    state: Literal["downloading", "done", "failed"] = "downloading"
    done_bytes: int = 0
    total_bytes: int | None = None
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    _samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=256))

    def report(self, done: int, total: int | None) -> None:
        """Called from the download thread with each chunk."""
        now = time.monotonic()
        self.done_bytes, self.total_bytes = done, total
        if not self._samples or now - self._samples[-1][0] >= 0.1:
            self._samples.append((now, done))

    def rate(self) -> float | None:
        """Bytes per second over the last RATE_WINDOW seconds."""
        samples = list(self._samples)
        now = time.monotonic()
        recent = [s for s in samples if now - s[0] <= RATE_WINDOW] or samples[-1:]
        if not recent or self.state != "downloading":
            return None
        t0, b0 = recent[0]
        elapsed = now - t0
        return (self.done_bytes - b0) / elapsed if elapsed > 0.5 else None

    def to_json(self) -> dict[str, Any]:
        rate = self.rate()
        left = None
        if rate and self.total_bytes is not None:
            left = max(self.total_bytes - self.done_bytes, 0) / rate
        end = self.ended if self.ended is not None else time.monotonic()
        return {
            "model": self.model,
            "state": self.state,
            "done_bytes": self.done_bytes,
            "total_bytes": self.total_bytes,
            "bytes_per_second": None if rate is None else round(rate),
            "eta_seconds": None if left is None else round(left, 1),
            "seconds": round(end - self.started, 1),
            "error": self.error,
        }


class Downloads:
    """The downloads this server runs, by model id (the last one of each model is kept,
    finished or failed, so the page can say how it ended)."""

    def __init__(self, registry: Registry, fetch: Fetch = download) -> None:
        self.registry = registry
        self._fetch = fetch
        self._pulls: dict[str, Pull] = {}
        self._tasks: dict[str, asyncio.Task[Path]] = {}

    def get(self, model_id: str) -> Pull | None:
        return self._pulls.get(model_id)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {model_id: pull.to_json() for model_id, pull in self._pulls.items()}

    def start(self, spec: ModelSpec, *, progress: bool = False) -> Pull:
        """Start fetching `spec` (or join the fetch under way) and return at once."""
        task = self._tasks.get(spec.id)
        if task is None or task.done():
            pull = Pull(spec.id)
            self._pulls[spec.id] = pull
            task = asyncio.ensure_future(self._run(spec, pull, progress))
            task.add_done_callback(_quiet)
            self._tasks[spec.id] = task
        return self._pulls[spec.id]

    def pull(self, spec: ModelSpec) -> Pull | None:
        """Start (or join) the download of a model that is not here; None when its file
        is here already."""
        if not self.running(spec.id) and local_file(spec) is not None:
            return None
        return self.start(spec)

    async def fetch(self, spec: ModelSpec, *, progress: bool = False) -> Path:
        """Fetch `spec` and wait for it; raises DownloadError."""
        self.start(spec, progress=progress)
        return await asyncio.shield(self._tasks[spec.id])

    def running(self, model_id: str) -> bool:
        task = self._tasks.get(model_id)
        return task is not None and not task.done()

    async def _run(self, spec: ModelSpec, pull: Pull, progress: bool) -> Path:
        log.info("model %s: download started", spec.id)
        loop = asyncio.get_running_loop()
        result: asyncio.Future[Path] = loop.create_future()

        def work() -> None:
            path: Path | None = None
            error: BaseException | None = None
            try:
                path = self._fetch(spec, progress=progress, report=pull.report)
            except BaseException as exc:
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop is gone: shutting down
                loop.call_soon_threadsafe(_settle, result, path, error)

        # A daemon thread: a shutdown never waits for a 7 GB transfer (the next pull
        # resumes its partial file).
        threading.Thread(target=work, name=f"hostler-pull-{spec.id}", daemon=True).start()
        try:
            path = await result
        except Exception as exc:
            pull.state, pull.error, pull.ended = "failed", _reason(exc), time.monotonic()
            log.error("model %s: download failed: %s", spec.id, pull.error)
            raise
        pull.state, pull.ended = "done", time.monotonic()
        if pull.total_bytes is None:
            pull.done_bytes = pull.total_bytes = path.stat().st_size
        log.info("model %s downloaded", spec.id)
        return path

    def close(self) -> None:
        """Stop waiting for downloads (their threads end with the process; a partial
        file is resumed by the next pull)."""
        for task in self._tasks.values():
            task.cancel()


def _settle(future: asyncio.Future[Path], path: Path | None, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        assert path is not None
        future.set_result(path)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, HostlerError | DownloadError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _quiet(task: asyncio.Task[Path]) -> None:
    """A failed pull nobody waits for is reported on the page, not as 'never retrieved'."""
    if not task.cancelled():
        task.exception()
