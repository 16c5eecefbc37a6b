"""The engine thread: continuous batching of many sequences on one llama context.

Each step puts every active sequence into one batch (one token per decoding sequence,
prompt chunks for prefilling ones under the `n_batch` budget), calls `llama_decode`
once, samples each sequence from its own logits row, and hands all outputs of the step
to the asyncio loop in one call.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from server.engine.detokenizer import TextStream
from server.engine.llama import Batch, ContextOptions, LlamaModel
from server.engine.sampling import GrammarDeadEnd, SeqSampler
from server.engine.types import (
    FinishReason,
    GenerationRequest,
    ModelInfo,
    SeqOutput,
    TokenLogprob,
)
from server.errors import BadRequestError, QueueFullError, ServiceUnavailableError

log = logging.getLogger("hostler.engine")


class _Handle:
    """The caller's side of a submitted request: an async iterator of step outputs."""

    def __init__(self, engine: LlamaEngine, request_id: int, n: int) -> None:
        self._engine = engine
        self.request_id = request_id
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[list[SeqOutput]] = asyncio.Queue()
        self._open = n
        # A handle dropped without being iterated still frees its slots.
        self._finalizer = weakref.finalize(self, engine.cancel, request_id)

    def _put(self, outputs: list[SeqOutput]) -> None:
        self._queue.put_nowait(outputs)

    async def _iterate(self) -> AsyncIterator[list[SeqOutput]]:
        try:
            while self._open > 0:
                outputs = await self._queue.get()
                if not self._queue.empty():
                    # The consumer fell behind: fold the waiting steps into one item, so
                    # a slow client costs one chunk per wake-up rather than one per token.
                    steps = [outputs]
                    while not self._queue.empty():
                        steps.append(self._queue.get_nowait())
                    outputs = merge_steps(steps)
                self._open -= sum(1 for o in outputs if o.finish_reason is not None)
                yield outputs
        finally:
            # Cancellation lives here: a consumer that stops early frees its slots.
            if self._open > 0:
                self.cancel()

    def __aiter__(self) -> AsyncIterator[list[SeqOutput]]:
        return self._iterate()

    def cancel(self) -> None:
        self._finalizer()


@dataclass(eq=False)
class _Seq:
    """One choice of one request, from admission to finish."""

    request_id: int
    index: int
    request: GenerationRequest
    handle: _Handle
    parent: _Seq | None = None
    sampler: SeqSampler | None = None
    stream: TextStream = field(default_factory=TextStream)
    slot: _Slot | None = None
    n_past: int = 0  # tokens of this sequence in the KV cache
    cached: int = 0
    generated: list[int] = field(default_factory=list)
    next_token: int = -1  # sampled, not yet decoded
    finished: bool = False

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.request.prompt_tokens)


@dataclass(eq=False)
class _Slot:
    """One llama sequence id: the tokens its KV cells hold, and who uses it now."""

    id: int
    tokens: list[int] = field(default_factory=list)
    seq: _Seq | None = None
    last_used: float = 0.0


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


class LlamaEngine:
    """A model served by one engine thread with `slots` parallel sequences."""

    def __init__(self, path: Path, options: ContextOptions, *, max_queue: int = 64) -> None:
        self.model = LlamaModel(path, options)
        self.info: ModelInfo = self.model.info
        self.max_queue = max_queue
        self._slots = [_Slot(i) for i in range(options.slots)]
        self._batch = Batch(options.n_batch)
        self._n_batch = options.n_batch
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._incoming: deque[list[_Seq]] = deque()  # guarded by _cond
        self._cancelled: set[int] = set()  # guarded by _cond
        self._queued = 0  # requests submitted, not yet admitted; guarded by _cond
        self._waiting: deque[_Seq] = deque()  # engine thread only
        self._active: list[_Seq] = []  # engine thread only
        self._stopping = False
        self._fatal: str | None = None
        self.stats = {"requests": 0, "steps": 0, "tokens": 0, "cached_tokens": 0}
        self._thread = threading.Thread(target=self._run, name="hostler-engine", daemon=True)
        self._thread.start()

    # -- the caller's side (any thread) ------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return self.model.tokenize(text, add_special=add_special)

    def token_text(self, token_id: int) -> str:
        return self.model.special_text(token_id)

    def grammar_error(self, grammar: str) -> str | None:
        return self.model.grammar_error(grammar)

    def submit(self, request: GenerationRequest) -> _Handle:
        """Queue a request; raises QueueFullError when the wait queue is full."""
        if not request.prompt_tokens:
            # Nothing to decode: the slot would never produce logits to sample from.
            raise BadRequestError("the prompt is empty", param="prompt")
        if self._fatal:
            raise ServiceUnavailableError(f"the engine stopped: {self._fatal}")
        if self._stopping:
            raise ServiceUnavailableError("the server is shutting down")
        with self._cond:
            if self._queued >= self.max_queue:
                raise QueueFullError(
                    "too many requests are waiting; try again shortly",
                    headers={"Retry-After": "1"},
                )
            request_id = next(self._ids)
            handle = _Handle(self, request_id, request.n)
            first = _Seq(request_id, 0, request, handle)
            seqs = [first] + [
                _Seq(request_id, i, request, handle, parent=first) for i in range(1, request.n)
            ]
            self._incoming.append(seqs)
            self._queued += 1
            self._cond.notify()
        return handle

    def cancel(self, request_id: int) -> None:
        with self._cond:
            self._cancelled.add(request_id)
            self._cond.notify()

    def health(self) -> dict[str, Any]:
        with self._cond:
            queued = self._queued
        return {
            "status": "error" if self._fatal else "ok",
            "slots": len(self._slots),
            "slots_busy": sum(1 for s in self._slots if s.seq is not None),
            "queued": queued,
            **self.stats,
        }

    @property
    def busy(self) -> bool:
        with self._cond:
            return bool(self._queued or self._incoming) or any(s.seq for s in self._slots)

    def close(self) -> None:
        """Stop the thread (ending whatever still runs) and free llama.cpp memory."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=30)
        self.model.close()

    # -- the engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (
                        self._incoming
                        or self._cancelled
                        or self._active
                        or self._waiting
                        or self._stopping
                    ):
                        self._cond.wait()
                    incoming = list(self._incoming)
                    self._incoming.clear()
                    cancelled = set(self._cancelled)
                    self._cancelled.clear()
                    stopping = self._stopping
                for seqs in incoming:
                    self._waiting.extend(seqs)
                out = self._finish_cancelled(cancelled, stopping)
                self._admit()
                out.extend(self._step())
                self._deliver(out)
                if stopping and not self._active and not self._waiting:
                    return
        except Exception as exc:  # pragma: no cover - a bug or a llama.cpp failure
            log.exception("engine thread failed")
            self._fatal = type(exc).__name__
            self._fail_all(str(exc))

    def _finish_cancelled(
        self, cancelled: set[int], stopping: bool
    ) -> list[tuple[_Seq, SeqOutput]]:
        out: list[tuple[_Seq, SeqOutput]] = []
        if not cancelled and not stopping:
            return out
        for seq in [*self._active, *self._waiting]:
            if stopping or seq.request_id in cancelled:
                out.append((seq, self._finish(seq, "cancelled")))
        return out

    def _admit(self) -> None:
        """Move waiting sequences into free slots, reusing the longest cached prefix."""
        while self._waiting:
            free = [s for s in self._slots if s.seq is None]
            if not free:
                return
            seq = next((s for s in self._waiting if self._ready(s)), None)
            if seq is None:
                return
            self._waiting.remove(seq)
            if seq.index == 0:
                with self._cond:
                    self._queued -= 1
            try:
                self._place(seq, free)
            except Exception as exc:
                log.exception("could not start a sequence")
                self._deliver([(seq, self._finish(seq, "error", str(exc)))])

    @staticmethod
    def _ready(seq: _Seq) -> bool:
        # Extra choices (n > 1) wait for the first one's prefill, then copy its cache.
        return seq.parent is None or not seq.parent.prefilling or seq.parent.finished

    def _place(self, seq: _Seq, free: list[_Slot]) -> None:
        prompt = seq.request.prompt_tokens
        # Best idle slot to reuse in place, and best slot (any) to copy a prefix from.
        in_place = max(free, key=lambda s: (_common_prefix(prompt, s.tokens), -s.last_used))
        n_in_place = _common_prefix(prompt, in_place.tokens)
        donor, n_copy = None, 0
        for s in self._slots:
            if s is in_place:
                continue
            n = _common_prefix(prompt, s.tokens)
            if n > n_copy:
                donor, n_copy = s, n
        if donor is not None and n_copy > n_in_place:
            # Copy into the least valuable free slot: the emptiest, least recently used.
            target = min(free, key=lambda s: (s is donor, len(s.tokens) > 0, s.last_used))
            keep = min(n_copy, len(prompt) - 1)
            self.model.seq_rm(target.id, -1, -1)
            if keep > 0:
                self.model.seq_cp(donor.id, target.id, 0, keep)
            target.tokens = prompt[:keep]
        else:
            target = in_place
            keep = min(n_in_place, len(prompt) - 1)
            if not self.model.seq_rm(target.id, keep, -1):
                self.model.seq_rm(target.id, -1, -1)
                keep = 0
            target.tokens = target.tokens[:keep]
        target.seq = seq
        target.last_used = time.monotonic()
        seq.slot = target
        seq.n_past = keep
        seq.cached = keep
        seed = seq.request.params.seed
        seq.sampler = SeqSampler(
            self.model, seq.request.params, None if seed is None else seed + seq.index
        )
        seq.stream = TextStream(seq.request.stop)
        self._active.append(seq)
        self.stats["requests"] += 1
        self.stats["cached_tokens"] += keep

    def _step(self) -> list[tuple[_Seq, SeqOutput]]:
        if not self._active:
            return []
        batch = self._batch
        batch.clear()
        sampling: list[tuple[_Seq, int]] = []
        added: list[tuple[_Seq, list[int]]] = []
        # Decoding sequences first: one token each keeps their streams moving.
        for seq in self._active:
            if not seq.prefilling and seq.slot is not None:
                idx = batch.add([seq.next_token], seq.n_past, seq.slot.id, True)
                sampling.append((seq, idx))
                added.append((seq, [seq.next_token]))
        for seq in self._active:
            if seq.prefilling and seq.slot is not None and batch.free > 0:
                prompt = seq.request.prompt_tokens
                chunk = prompt[seq.n_past : seq.n_past + batch.free]
                last = seq.n_past + len(chunk) == len(prompt)
                idx = batch.add(chunk, seq.n_past, seq.slot.id, last)
                added.append((seq, chunk))
                if last:
                    sampling.append((seq, idx))
        if batch.n == 0:
            return []
        rc = self.model.decode(batch)
        if rc != 0:
            return self._decode_failed(rc)
        self.stats["steps"] += 1
        for seq, tokens in added:
            assert seq.slot is not None
            seq.slot.tokens.extend(tokens)
            seq.n_past += len(tokens)
        out: list[tuple[_Seq, SeqOutput]] = []
        for seq, idx in sampling:
            o = self._sample(seq, idx)
            if o is not None:
                out.append((seq, o))
        return out

    def _sample(self, seq: _Seq, idx: int) -> SeqOutput | None:
        assert seq.sampler is not None
        req = seq.request
        try:
            token, logprob = seq.sampler.sample(idx, len(seq.generated))
        except GrammarDeadEnd as exc:
            # A finished document whose end was banned ends here; otherwise the bans
            # excluded everything the grammar allows, which no token can satisfy.
            if exc.complete:
                return self._finish(seq, "stop")
            return self._finish(seq, "error", str(exc))
        self.stats["tokens"] += 1
        seq.generated.append(token)
        seq.next_token = token
        finish: FinishReason | None = None
        text = ""
        eog = self.model.is_eog(token) or token in req.stop_token_ids
        if eog and not req.params.ignore_eos:
            finish = "stop"
        else:
            text = seq.stream.push(self.model.piece(token, req.render_special))
            if seq.stream.stopped:
                finish = "stop"
            elif len(seq.generated) >= req.max_tokens or seq.n_past + 1 >= self.model.n_ctx:
                finish = "length"
        logprobs: list[TokenLogprob] | None = [logprob] if logprob is not None else None
        if finish is not None:
            o = self._finish(seq, finish)
            o.text = text + o.text
            o.token_ids = [token]
            o.logprobs = logprobs
            return o
        return SeqOutput(
            index=seq.index,
            text=text,
            token_ids=[token],
            logprobs=logprobs,
            prompt_tokens=len(req.prompt_tokens),
            cached_tokens=seq.cached,
            completion_tokens=len(seq.generated),
        )

    def _finish(self, seq: _Seq, reason: FinishReason, error: str | None = None) -> SeqOutput:
        seq.finished = True
        tail = seq.stream.flush() if reason in ("stop", "length") else ""
        if seq in self._active:
            self._active.remove(seq)
        elif seq in self._waiting:
            self._waiting.remove(seq)
            if seq.index == 0:
                with self._cond:
                    self._queued -= 1
        if seq.slot is not None:
            seq.slot.seq = None
            seq.slot.last_used = time.monotonic()
            seq.slot = None
        if seq.sampler is not None:
            seq.sampler.close()
        return SeqOutput(
            index=seq.index,
            text=tail,
            finish_reason=reason,
            error=error,
            prompt_tokens=len(seq.request.prompt_tokens),
            cached_tokens=seq.cached,
            completion_tokens=len(seq.generated),
        )

    def _decode_failed(self, rc: int) -> list[tuple[_Seq, SeqOutput]]:
        """No room in the KV cache (rc 1): drop idle caches, else end the newest sequence."""
        out: list[tuple[_Seq, SeqOutput]] = []
        if rc == 1:
            idle = [s for s in self._slots if s.seq is None and s.tokens]
            if idle:
                for s in idle:
                    self.model.seq_rm(s.id, -1, -1)
                    s.tokens = []
                return out
            victim = self._active[-1]
            self._reset_slot(victim)
            out.append((victim, self._finish(victim, "error", "the context (KV cache) is full")))
            return out
        # Any other failure: the batch's sequences cannot continue.
        for seq in list(self._active):
            self._reset_slot(seq)
            out.append((seq, self._finish(seq, "error", f"llama_decode failed ({rc})")))
        return out

    def _reset_slot(self, seq: _Seq) -> None:
        if seq.slot is not None:
            self.model.seq_rm(seq.slot.id, -1, -1)
            seq.slot.tokens = []

    def _deliver(self, out: list[tuple[_Seq, SeqOutput]]) -> None:
        """Hand the step's outputs to each request's loop: one call per loop per step."""
        if not out:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Handle, list[SeqOutput]]]] = {}
        by_handle: dict[_Handle, list[SeqOutput]] = {}
        for seq, o in out:
            by_handle.setdefault(seq.handle, []).append(o)
        for handle, outputs in by_handle.items():
            by_loop.setdefault(handle._loop, []).append((handle, outputs))
        for loop, items in by_loop.items():
            # A closed loop means nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_dispatch, items)

    def _fail_all(self, message: str) -> None:
        with self._cond:
            for seqs in self._incoming:
                self._waiting.extend(seqs)
            self._incoming.clear()
        out = [
            (seq, self._finish(seq, "error", message)) for seq in [*self._active, *self._waiting]
        ]
        self._deliver(out)


def merge_steps(steps: list[list[SeqOutput]]) -> list[SeqOutput]:
    """Several steps' outputs as one: per choice, text and tokens joined in order."""
    merged: dict[int, SeqOutput] = {}
    for outputs in steps:
        for o in outputs:
            m = merged.get(o.index)
            if m is None:  # a copy: the lists below grow
                merged[o.index] = dataclasses.replace(
                    o,
                    token_ids=list(o.token_ids),
                    logprobs=None if o.logprobs is None else list(o.logprobs),
                )
                continue
            m.text += o.text
            m.token_ids.extend(o.token_ids)
            if o.logprobs is not None:
                m.logprobs = (m.logprobs or []) + o.logprobs
            m.finish_reason = o.finish_reason or m.finish_reason
            m.error = o.error or m.error
            m.prompt_tokens = o.prompt_tokens
            m.cached_tokens = o.cached_tokens
            m.completion_tokens = o.completion_tokens
    return list(merged.values())


def _dispatch(items: list[tuple[_Handle, list[SeqOutput]]]) -> None:
    for handle, outputs in items:
        handle._put(outputs)
