"""An engine in a child process of its own: the API process survives anything llama.cpp does.

`ProcessEngine` is the `Engine` (and `Embedder`) the serving layer sees; the model, its
scheduler thread, sampler chains and prompt caches live in `python -m
server.engine.child` (engine/child.py). One message crosses per engine step with every
sequence's outputs; tokenizing stays in this process on a vocabulary-only copy of the
model (no weights, no context); grammar checks go to the child, where an abort costs
only that engine.

If the child dies (a signal, an abort, an exit), every request it was serving ends at
once with an error (`SeqOutput.unavailable`: a 503 naming the model and the cause, or an
error event on a stream), the engine reports itself `dead`, and the pool loads the
model again on the next request (engine/pool.py keeps the crash-loop guard).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from server.engine.cpu import crash_hint
from server.engine.llama import ContextOptions, LlamaVocab
from server.engine.scheduler import StepHandle, dispatch
from server.engine.types import GenerationRequest, ModelInfo, SeqOutput
from server.errors import (
    BadRequestError,
    EngineError,
    EngineGoneError,
    HostlerError,
    ModelLoadError,
    QueueFullError,
    ServiceUnavailableError,
)

log = logging.getLogger("hostler.engine")

LOAD_TIMEOUT = 600.0
CLOSE_TIMEOUT = 60.0
STDERR_LINES = 30


def describe_exit(code: int | None) -> str:
    if code is None:
        return "it stopped answering"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class ProcessEngine:
    """A model served by its own engine process (see the module doc)."""

    def __init__(
        self,
        model_id: str,
        kind: str,
        path: Path,
        options: ContextOptions,
        kwargs: dict[str, Any],
        *,
        max_queue: int = 64,
    ) -> None:
        self.model_id = model_id
        self.kind = kind
        self.max_queue = max_queue
        self.dead: str | None = None
        """Why the engine process died (None while it lives)."""
        self.died_at: float | None = None
        self.stderr: deque[str] = deque(maxlen=STDERR_LINES)
        self._vocab = LlamaVocab(path)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._handles: dict[int, tuple[StepHandle, set[int]]] = {}  # id -> (handle, open)
        self._jobs: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]] = {}
        self._replies: dict[int, tuple[threading.Event, list[Any]]] = {}
        self._ids = itertools.count(1)
        self._health: dict[str, Any] = {"status": "ok"}
        self._closing = False
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["HOSTLER_CHILD_LOG_LEVEL"] = logging.getLevelName(
            logging.getLogger("hostler").getEffectiveLevel()
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.engine.child", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,  # a Ctrl-C in the terminal is the parent's to handle
        )
        theirs.close()
        self.pid = self.proc.pid
        self._conn = Connection(ours.detach())
        self._stderr_thread = threading.Thread(
            target=self._read_stderr, name=f"hostler-stderr-{model_id}", daemon=True
        )
        self._stderr_thread.start()
        try:
            self._conn.send((kind, str(path), options, kwargs))
            self.info: ModelInfo = self._wait_ready()
        except BaseException:
            self._kill()
            self._vocab.close()
            raise
        self._reader = threading.Thread(
            target=self._read, name=f"hostler-ipc-{model_id}", daemon=True
        )
        self._reader.start()

    # -- start-up -------------------------------------------------------------------------

    def _wait_ready(self) -> ModelInfo:
        deadline = time.monotonic() + LOAD_TIMEOUT
        while time.monotonic() < deadline:
            if self._conn.poll(0.2):
                try:
                    msg = self._conn.recv()
                except (EOFError, OSError):
                    break
                if msg[0] == "ready":
                    info: ModelInfo = msg[1]
                    self._health = msg[3]
                    return info
                if msg[0] == "load_error":
                    raise ModelLoadError(str(msg[1]))
            elif self.proc.poll() is not None:
                break
        code = self._exit_code(timeout=5)
        raise ModelLoadError(self._death_message(code, loading=True))

    def _exit_code(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def _death_message(self, code: int | None, loading: bool = False) -> str:
        when = "while loading" if loading else "while serving"
        parts = [
            f"the engine process of model '{self.model_id}' died {when} ({describe_exit(code)})"
        ]
        hint = crash_hint(code)
        if hint:
            parts.append(hint)
        tail = [line for line in self.stderr if line.strip()][-5:]
        if tail:
            parts.append("last output: " + " | ".join(tail))
        return "; ".join(parts)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            self.stderr.append(line)
            print(line, file=sys.stderr, flush=True)

    # -- the caller's side ---------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return self._vocab.tokenize(text, add_special=add_special)

    def token_text(self, token_id: int) -> str:
        return self._vocab.special_text(token_id)

    def grammar_error(self, grammar: str) -> str | None:
        """Compiled in the engine process: a grammar that aborts llama.cpp costs that
        engine, not the server."""
        value = self._call("grammar", grammar)
        return None if value is None else str(value)

    def _call(self, kind: str, arg: Any, timeout: float = 60.0) -> Any:
        self._alive()
        qid = next(self._ids)
        event, box = threading.Event(), list[Any]()
        with self._lock:
            self._replies[qid] = (event, box)
        self._send((kind, qid, arg))
        if not event.wait(timeout) or not box:
            with self._lock:
                self._replies.pop(qid, None)
            raise ServiceUnavailableError(self.dead or f"model '{self.model_id}' did not answer")
        return box[0]

    def submit(self, request: GenerationRequest) -> StepHandle:
        if not request.prompt_tokens:
            raise BadRequestError("the prompt is empty", param="prompt")
        self._alive()
        with self._lock:
            if len(self._handles) >= self.info.slots + self.max_queue:
                raise QueueFullError(
                    "too many requests are waiting; try again shortly",
                    headers={"Retry-After": "1"},
                )
            rid = next(self._ids)
            handle = StepHandle(self, rid, request.n)
            self._handles[rid] = (handle, set(range(request.n)))
        self._send(("submit", rid, request))
        return handle

    def cancel(self, request_id: int) -> None:
        """The engine process ends the request; its last outputs (finish "cancelled")
        end the handle, as in-process."""
        with self._lock:
            known = request_id in self._handles
        if known and self.dead is None:
            with contextlib.suppress(OSError, ServiceUnavailableError):
                self._send(("cancel", request_id))

    async def embed(self, inputs: list[list[int]]) -> list[npt.NDArray[np.float32]]:
        if not inputs:
            return []
        self._alive()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        jid = next(self._ids)
        with self._lock:
            self._jobs[jid] = (loop, future)
        self._send(("embed", jid, inputs))
        try:
            result: list[npt.NDArray[np.float32]] = await future
            return result
        finally:
            if not future.done() or future.cancelled():
                with self._lock:
                    self._jobs.pop(jid, None)
                with contextlib.suppress(OSError, ServiceUnavailableError):
                    self._send(("cancel_embed", jid))

    def pair_tokens(self, query: str, document: str) -> list[int]:
        return self._vocab.rerank_pair(query, document)

    def health(self) -> dict[str, Any]:
        """The engine's health as its last step (or reply) carried it, with the
        process's pid and resident memory: no round trip."""
        if self.dead is not None:
            return {"status": "error", "error": self.dead, "pid": self.pid}
        return {**self._health, "pid": self.pid, "rss_bytes": rss_bytes(self.pid)}

    @property
    def busy(self) -> bool:
        with self._lock:
            return self.dead is None and bool(self._handles or self._jobs)

    def close(self) -> None:
        """Ask the engine process to finish (it saves its prompt caches) and wait for it
        to exit; killed past CLOSE_TIMEOUT. All of its memory goes with it."""
        self._closing = True
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self._send(("close",))
            if self._exit_code(timeout=CLOSE_TIMEOUT) is None:
                log.warning("engine of %s did not exit; killing it", self.model_id)
                self._kill()
        self._vocab.close()

    def _kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        self._exit_code(timeout=10)

    def _alive(self) -> None:
        if self.dead is not None:
            raise EngineGoneError(self.dead, headers={"Retry-After": "1"})

    def _send(self, msg: tuple[Any, ...]) -> None:
        try:
            with self._send_lock:
                self._conn.send(msg)
        except OSError as exc:
            raise ServiceUnavailableError(
                self.dead or f"the engine process of model '{self.model_id}' is gone"
            ) from exc

    # -- the reader thread ---------------------------------------------------------------

    def _read(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = msg[0]
            if kind == "step":
                if msg[2] is not None:
                    self._health = msg[2]
                self._deliver(msg[1])
            elif kind == "embedded":
                if msg[5] is not None:
                    self._health = msg[5]
                self._embedded(msg[1], msg[2], msg[3], msg[4])
            elif kind == "reply":
                with self._lock:
                    waiter = self._replies.pop(msg[1], None)
                if waiter is not None:
                    waiter[1].append(msg[2])
                    waiter[0].set()
            elif kind == "closed":
                break
        if self._closing:
            return
        self._died(self._exit_code(timeout=5))

    def _deliver(self, items: list[tuple[int, list[SeqOutput]]]) -> None:
        grouped: list[tuple[StepHandle, list[SeqOutput]]] = []
        with self._lock:
            for rid, outputs in items:
                entry = self._handles.get(rid)
                if entry is None:
                    continue  # ended already
                handle, open_ = entry
                for o in outputs:
                    if o.finish_reason is not None:
                        open_.discard(o.index)
                if not open_:
                    del self._handles[rid]
                grouped.append((handle, outputs))
        _to_loops(grouped)

    def _embedded(self, jid: int, out: Any, error: str | None, status: int) -> None:
        with self._lock:
            entry = self._jobs.pop(jid, None)
        if entry is None:
            return
        loop, future = entry

        def settle() -> None:
            if future.done():
                return
            if error is None:
                future.set_result(out)
            else:
                future.set_exception(_error(status, error))

        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle)

    def _died(self, code: int | None) -> None:
        """End everything this engine was serving, at once, with the cause."""
        message = self._death_message(code)
        self.died_at = time.monotonic()
        self.dead = message
        log.error("%s", message)
        with self._lock:
            handles, self._handles = self._handles, {}
            jobs, self._jobs = self._jobs, {}
            replies, self._replies = self._replies, {}
        _to_loops(
            [
                (h, [SeqOutput(index=i, finish_reason="error", error=message, unavailable=True)
                     for i in sorted(open_)])
                for h, open_ in handles.values()
            ]
        )  # fmt: skip
        for loop, future in jobs.values():

            def fail(future: asyncio.Future[Any] = future) -> None:
                if not future.done():
                    future.set_exception(EngineGoneError(message, headers={"Retry-After": "1"}))

            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fail)
        for event, _box in replies.values():
            event.set()


def _to_loops(items: list[tuple[StepHandle, list[SeqOutput]]]) -> None:
    """Hand outputs to their handles: one call per event loop, as the scheduler does."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[StepHandle, list[SeqOutput]]]] = {}
    for handle, outputs in items:
        by_loop.setdefault(handle._loop, []).append((handle, outputs))
    for loop, grouped in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody listens
            loop.call_soon_threadsafe(dispatch, grouped)


def _error(status: int, message: str) -> HostlerError:
    """An engine process's error as the exception of its status."""
    kinds: dict[int, type[HostlerError]] = {
        400: BadRequestError,
        429: QueueFullError,
        503: ServiceUnavailableError,
    }
    return kinds.get(status, EngineError)(message)


def rss_bytes(pid: int) -> int:
    """A process's resident memory (0 where /proc is not available)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")
