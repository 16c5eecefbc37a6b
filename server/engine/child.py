"""The engine process: one loaded model's llama context, scheduler and caches.

Started by `ProcessEngine` (engine/process.py) as `python -m server.engine.child FD`,
where FD is its end of a socket pair. It loads the model, runs one short decode (so a
llama.cpp build this CPU cannot run dies here, at load, not on a user's request), says
it is ready, then serves the parent's messages until told to close or until the parent
goes away (it dies with its parent: PR_SET_PDEATHSIG, and EOF on the socket).

Messages (tuples, pickled by multiprocessing's Connection):
  parent -> child: ("submit", id, GenerationRequest) ("cancel", id) ("embed", id, inputs)
                   ("cancel_embed", id) ("grammar", id, text) ("close",)
  child -> parent: ("ready", ModelInfo, pid, health) ("load_error", message)
                   ("step", [(id, [SeqOutput, ...]), ...], health | None)  one a step
                   ("embedded", id, vectors | None, error | None, status, health)
                   ("reply", id, value) ("closed",)
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

HEALTH_EVERY = 0.1  # seconds between health snapshots riding on step messages


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (no orphan holding VRAM)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _keep_freed_memory() -> None:
    """glibc: serve large blocks from the heap and keep freed memory mapped. A prompt
    cache state is tens of MB; glibc maps each block over 32 MB afresh, and zeroing and
    faulting in fresh pages cost 18 ms per 34 MB state saved (measured), where a block
    reused from the heap costs under 1 ms. The RAM tier's budget bounds what is kept."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks up to 1 GiB from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: return free heap top over 1 GiB only
    except (OSError, AttributeError):
        pass


class _Child:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._send_lock = threading.Lock()
        self.engine: Any = None
        self.embed_cancels: dict[int, Any] = {}
        self._stop = threading.Event()
        self._health_at = 0.0

    def send(self, msg: tuple[Any, ...]) -> None:
        with self._send_lock:
            self.conn.send(msg)

    def step(self, items: list[tuple[int, list[Any]]]) -> None:
        """The scheduler's sink: one message per engine step, with the engine's health
        when a choice finished or HEALTH_EVERY has passed (the parent's /health reads
        that snapshot: no round trip, and fresh when a reply is)."""
        now = time.monotonic()
        health = None
        finished = any(o.finish_reason for _, outs in items for o in outs)
        if finished or now - self._health_at >= HEALTH_EVERY:
            health, self._health_at = self.engine.health(), now
        try:
            self.send(("step", items, health))
        except OSError:
            self._stop.set()  # the parent is gone

    def load(self, kind: str, path: str, options: Any, kwargs: dict[str, Any]) -> None:
        from pathlib import Path

        from server.engine.types import GenerationRequest, SamplingParams

        if kind == "embedding":
            from server.engine.embedding import EmbeddingEngine

            self.engine = EmbeddingEngine(Path(path), options, **kwargs)
            warm = [self.engine.tokenize("Hello, world. " * 4, add_special=True)]
            done = threading.Event()
            self.engine.start(warm, lambda _out, _exc: done.set())
            done.wait(120)
            return
        from server.engine.cache import open_cache
        from server.engine.scheduler import LlamaEngine

        spec = kwargs.pop("prompt_cache", None)
        cache = None
        if spec:
            cache = open_cache(
                Path(path),
                spec["settings"],
                ram_mib=spec["ram_mib"],
                disk_gib=spec["disk_gib"],
                folder=spec["folder"],
            )
        warmed = threading.Event()

        def sink(items: list[tuple[int, list[Any]]]) -> None:
            real = [(rid, outs) for rid, outs in items if rid != 0]  # 0: the warm-up
            if len(real) < len(items):
                warmed.set()
            if real:
                self.step(real)

        self.engine = LlamaEngine(Path(path), options, prompt_cache=cache, deliver=sink, **kwargs)
        tokens = self.engine.tokenize("Hello, world. " * 4, add_special=True)
        request = GenerationRequest(tokens, SamplingParams(temperature=0), max_tokens=1)
        self.engine.submit_as(request, 0)
        warmed.wait(120)

    def serve(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                break  # the parent is gone
            kind = msg[0]
            if kind == "close":
                break
            try:
                self.handle(msg)
            except Exception as exc:  # a bad message ends that request, never the engine
                logging.getLogger("hostler.engine").exception("message %s failed", kind)
                self.fail(msg, exc)
        self._stop.set()
        self.engine.close()
        with contextlib.suppress(OSError):
            self.send(("closed",))

    def handle(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "submit":
            self.engine.submit_as(msg[2], msg[1])
        elif kind == "cancel":
            self.engine.cancel(msg[1])
        elif kind == "embed":
            job_id = msg[1]

            def done(out: Any, exc: Any, job_id: int = job_id) -> None:
                self.embed_cancels.pop(job_id, None)
                status = getattr(exc, "status", 500)
                error = None if exc is None else str(exc)
                self.send(("embedded", job_id, out, error, status, self.engine.health()))

            self.embed_cancels[job_id] = self.engine.start(msg[2], done)
        elif kind == "cancel_embed":
            cancel = self.embed_cancels.pop(msg[1], None)
            if cancel is not None:
                cancel()
        elif kind == "grammar":
            self.send(("reply", msg[1], self.engine.grammar_error(msg[2])))

    def fail(self, msg: tuple[Any, ...], exc: Exception) -> None:
        from server.engine.types import SeqOutput

        kind, status = msg[0], getattr(exc, "status", 500)
        if kind == "submit":
            n = msg[2].n
            outs = [SeqOutput(index=i, finish_reason="error", error=str(exc)) for i in range(n)]
            self.step([(msg[1], outs)])
        elif kind == "embed":
            self.send(("embedded", msg[1], None, str(exc), status, None))
        elif kind == "grammar":
            self.send(("reply", msg[1], str(exc)))


def main(argv: list[str]) -> int:
    _die_with_parent()
    _keep_freed_memory()
    # The parent decides when this process ends (after its streams finish): a Ctrl-C or
    # a SIGTERM sent to the whole group (systemd) must not cut them off.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The engine thread and this thread (which reads the parent's messages) share the
    # GIL: a short switch interval keeps a new request from waiting up to 5 ms for it.
    sys.setswitchinterval(0.0005)
    # A fatal ggml error (a dead RPC worker: "Remote RPC server crashed") aborts this
    # process; without a gdb backtrace its message is the last output the pool reports.
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    conn = Connection(int(argv[1]))
    level = os.environ.get("HOSTLER_CHILD_LOG_LEVEL", "WARNING").upper()
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    child = _Child(conn)
    try:
        kind, path, options, kwargs = conn.recv()
        child.load(kind, path, options, kwargs)
    except (EOFError, OSError):
        return 1
    except Exception as exc:
        logging.getLogger("hostler.engine").debug("load failed", exc_info=True)
        child.send(("load_error", str(exc) or type(exc).__name__))
        return 1
    child.send(("ready", child.engine.info, os.getpid(), child.engine.health()))
    child.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
