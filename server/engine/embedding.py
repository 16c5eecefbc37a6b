"""Embedding and rerank models: many inputs packed into one decode, one pooled output each.

One thread owns the llama context, as for chat models. Each decode takes inputs from
every waiting request in turn (round robin, so a 2,048-input request never holds a
one-input request back for long), one sequence per input, up to `slots` sequences and
about `batch_tokens` tokens; a longer input goes alone. The context's physical batch is
its whole size, so any input that fits the context is accepted (llama-server refuses
those above its 512-token default batch). Outputs are copied out, the KV memory is
cleared, and each request is answered once all its inputs are done.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from server.engine.llama import Batch, ContextOptions, LlamaModel
from server.engine.types import GenerationRequest, ModelInfo
from server.errors import (
    BadRequestError,
    HostlerError,
    ModelLoadError,
    QueueFullError,
    ServiceUnavailableError,
)

log = logging.getLogger("hostler.embedding")

Vector = npt.NDArray[np.float32]


Done = Callable[[list[Vector] | None, HostlerError | None], None]
"""Called once from the engine thread: the outputs, or why there are none."""


@dataclass(eq=False)
class _Job:
    """One request's inputs: those not yet decoded, and the outputs so far."""

    inputs: list[list[int]]
    done: Done
    pending: deque[int] = field(default_factory=deque)
    results: list[Vector | None] = field(default_factory=list)
    left: int = 0
    cancelled: bool = False
    finished: bool = False
    """`done` was called (once, with outputs or an error)."""


class EmbeddingEngine:
    """An embedding (or rerank) model served by one thread; see the module doc."""

    def __init__(
        self,
        path: Path,
        options: ContextOptions,
        *,
        max_queue: int = 64,
        batch_tokens: int = 2048,
    ) -> None:
        self.model = LlamaModel(path, dataclasses.replace(options, embeddings=True))
        pooling = self.model.pooling
        if pooling == "none":
            self.model.close()
            raise ModelLoadError(
                f"{path.name} has no pooling of its own (a chat model?): set `pooling: mean`"
                " (or cls, last, rank) for it in models.yaml"
            )
        self.size = self.model.embedding_size()
        self.info: ModelInfo = dataclasses.replace(
            self.model.info, pooling=pooling, n_embd=self.size
        )
        self.slots = options.slots
        self.max_queue = max_queue
        self.batch_tokens = max(1, min(batch_tokens, options.n_batch))
        self._batch = Batch(options.n_batch)
        self._cond = threading.Condition()
        self._jobs: deque[_Job] = deque()  # guarded by _cond
        self._running = 0  # sequences in the decode under way
        self._stopping = False
        self._fatal: str | None = None
        self.stats = {"requests": 0, "inputs": 0, "tokens": 0, "batches": 0}
        self._thread = threading.Thread(target=self._run, name="hostler-embed", daemon=True)
        self._thread.start()

    # -- the caller's side (any thread) ------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return self.model.tokenize(text, add_special=add_special)

    def token_text(self, token_id: int) -> str:
        return self.model.special_text(token_id)

    def grammar_error(self, grammar: str) -> str | None:
        return "an embedding model does not generate text"

    def pair_tokens(self, query: str, document: str) -> list[int]:
        """A (query, document) pair as this reranker reads it."""
        return self.model.rerank_pair(query, document)

    def submit(self, request: GenerationRequest) -> Any:
        raise BadRequestError(
            "this is an embedding model: it makes vectors (/v1/embeddings), not text",
            param="model",
        )

    async def embed(self, inputs: list[list[int]]) -> list[Vector]:
        """One output per input, in order. Raises QueueFullError when too many requests
        wait; a caller that stops waiting drops its inputs not yet decoded."""
        if not inputs:
            return []
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Vector]] = loop.create_future()

        def done(out: list[Vector] | None, exc: HostlerError | None) -> None:
            def settle() -> None:
                if future.done():
                    return
                if exc is not None:
                    future.set_exception(exc)
                else:
                    future.set_result(out or [])

            with contextlib.suppress(RuntimeError):  # its loop is gone: nobody waits
                loop.call_soon_threadsafe(settle)

        cancel = self.start(inputs, done)
        try:
            return await future
        finally:
            # A caller cancelled while it waits cancels the future too: drop the rest.
            if not future.done() or future.cancelled():
                cancel()

    def start(self, inputs: list[list[int]], done: Done) -> Callable[[], None]:
        """Queue `inputs`; `done` is called once from the engine thread. Returns a
        function that drops the inputs not yet decoded."""
        if self._fatal:
            raise ServiceUnavailableError(f"the engine stopped: {self._fatal}")
        if self._stopping:
            raise ServiceUnavailableError("the server is shutting down")
        limit = self.info.n_ctx
        for i, tokens in enumerate(inputs):
            if not tokens or len(tokens) > limit:  # checked by serving; never reaches llama
                raise BadRequestError(f"input {i} has {len(tokens)} tokens (1..{limit})")
        job = _Job(inputs, done)
        job.pending.extend(range(len(inputs)))
        job.results = [None] * len(inputs)
        job.left = len(inputs)
        with self._cond:
            if sum(1 for j in self._jobs if j.pending and not j.cancelled) >= self.max_queue:
                raise QueueFullError(
                    "too many embedding requests are waiting; try again shortly",
                    headers={"Retry-After": "1"},
                )
            self._jobs.append(job)
            self.stats["requests"] += 1
            self._cond.notify()

        def cancel() -> None:
            job.cancelled = True  # the thread drops it at its next batch

        return cancel

    def health(self) -> dict[str, Any]:
        with self._cond:
            queued = sum(len(j.pending) for j in self._jobs)
            running = self._running
        return {
            "status": "error" if self._fatal else "ok",
            "slots": self.slots,
            "slots_busy": running,
            "queued": queued,
            "pooling": self.info.pooling,
            **self.stats,
        }

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._running > 0 or any(j.pending and not j.cancelled for j in self._jobs)

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self.model.close()

    # -- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._jobs and not self._stopping:
                        self._cond.wait()
                    if self._stopping:
                        break
                    taken = self._take()
                    self._running = len(taken)
                done = self._decode(taken) if taken else []
                with self._cond:
                    self._running = 0
                for job in done:  # answered once the engine is idle again, so `busy` is
                    if not job.finished:  # false when they wake
                        job.finished = True
                        job.done([r for r in job.results if r is not None], None)
        except Exception as exc:  # never leave a caller waiting
            log.exception("the embedding engine failed")
            self._fatal = str(exc) or type(exc).__name__
        finally:
            with self._cond:
                jobs, self._jobs = list(self._jobs), deque()
            why = self._fatal or "the server is shutting down"
            for job in jobs:
                _fail(job, ServiceUnavailableError(f"the embedding engine stopped: {why}"))

    def _take(self) -> list[tuple[_Job, int]]:
        """The next batch, round robin over the waiting requests (under _cond)."""
        taken: list[tuple[_Job, int]] = []
        tokens = 0
        while self._jobs and len(taken) < self.slots:
            job = self._jobs[0]
            if job.cancelled or not job.pending:
                self._jobs.popleft()
                continue
            n = len(job.inputs[job.pending[0]])
            if taken and (tokens + n > self.batch_tokens or tokens + n > self._batch.capacity):
                break
            taken.append((job, job.pending.popleft()))
            tokens += n
            self._jobs.rotate(-1)  # the next input comes from the next request
        return taken

    def _decode(self, taken: list[tuple[_Job, int]]) -> list[_Job]:
        """Decode one batch; the jobs it completed."""
        batch = self._batch
        batch.clear()
        for seq, (job, i) in enumerate(taken):
            tokens = job.inputs[i]
            batch.add(tokens, 0, seq, want_last_logits=False)
        batch.logits[: batch.n] = 1  # an embedding context outputs (and pools) every token
        started = time.monotonic()
        rc = self.model.decode(batch)
        outputs: list[Vector | None] = []
        if rc == 0:
            outputs = [self.model.pooled(seq, self.size) for seq in range(len(taken))]
        self.model.clear()
        self.stats["batches"] += 1
        self.stats["inputs"] += len(taken)
        self.stats["tokens"] += batch.n
        log.debug(
            "embedded %d inputs (%d tokens) in %.0f ms",
            len(taken),
            batch.n,
            (time.monotonic() - started) * 1000,
        )
        done: list[_Job] = []
        for seq, (job, i) in enumerate(taken):
            out = outputs[seq] if outputs else None
            if out is None:
                _fail(job, ServiceUnavailableError(f"llama_decode failed ({rc}) on this batch"))
                continue
            if self.info.pooling != "rank":
                norm = float(np.linalg.norm(out))
                if norm > 0:
                    out /= norm
            job.results[i] = out
            job.left -= 1
            if job.left == 0:
                done.append(job)
        return done


def _fail(job: _Job, exc: HostlerError) -> None:
    job.cancelled = True
    if not job.finished:
        job.finished = True
        job.done(None, exc)
