"""The engine thread: continuous batching of many sequences on one llama context.

Each step puts every active sequence into one batch (one token per decoding sequence,
plus its n-gram draft where that pays; prompt chunks for prefilling ones under the
`n_batch` budget), calls `llama_decode` once, samples each sequence from its own logits
row (and its drafted rows, while they match), and hands all outputs of the step to the
asyncio loop in one call.

The rooms around it: `placement.py` (which slot a new sequence takes and what of its
prompt is cached), `decoding.py` (sampling one position, stops, bans, finishing),
`speculation.py` (drafts and when to use them), `handle.py` (the caller's side).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.engine.cache import PromptCache
from server.engine.decoding import Decoding
from server.engine.handle import StepHandle, dispatch, merge_steps
from server.engine.llama import Batch, ContextOptions, LlamaModel
from server.engine.placement import Placement
from server.engine.sequence import Seq, Slot, slot_view
from server.engine.speculation import (
    BUCKET_NAMES,
    MAX_DRAFT,
    Acceptance,
    Drafter,
    History,
    Mode,
    NgramIndex,
    StepCosts,
    costs_bucket,
    plan,
)
from server.engine.types import GenerationRequest, ModelInfo, SeqOutput
from server.errors import BadRequestError, QueueFullError, ServiceUnavailableError

log = logging.getLogger("hostler.engine")

__all__ = ["LlamaEngine", "StepHandle", "dispatch"]


class LlamaEngine:
    """A model served by one engine thread with `slots` parallel sequences."""

    def __init__(
        self,
        path: Path,
        options: ContextOptions,
        *,
        max_queue: int = 64,
        cache_reuse: int = 0,
        prompt_cache: PromptCache | None = None,
        speculative: Mode = "off",
        deliver: Callable[[list[tuple[int, list[SeqOutput]]]], None] | None = None,
    ) -> None:
        self.model = LlamaModel(path, options)
        # Chunk reuse needs a memory whose cells can move (not recurrent state, not M-RoPE).
        self.cache_reuse = cache_reuse if self.model.can_shift() else 0
        self.cache = prompt_cache
        self.info: ModelInfo = self.model.info
        self.max_queue = max_queue
        # Rejected drafts are cut off with seq_rm: a memory that cannot cut cannot draft.
        self.speculative: Mode = speculative if self.model.can_shift() else "off"
        self._slots = [Slot(i) for i in range(options.slots)]
        self._batch = Batch(options.n_batch)
        self._n_batch = options.n_batch
        self._ids = itertools.count(1)
        self._sink = deliver
        """In an engine process: each step's outputs by request id, in one call."""
        self._cond = threading.Condition()
        self._incoming: deque[list[Seq]] = deque()  # guarded by _cond
        self._cancelled: set[int] = set()  # guarded by _cond
        self._queued = 0  # requests submitted, not yet admitted; guarded by _cond
        self._waiting: deque[Seq] = deque()  # engine thread only
        self._active: list[Seq] = []  # engine thread only
        self._stopping = False
        self._fatal: str | None = None
        self.stats = {
            "requests": 0,
            "steps": 0,
            "tokens": 0,
            "cached_tokens": 0,
            "reused_chunk_tokens": 0,
            "restored_tokens": 0,
            "ban_rewinds": 0,
            "draft_steps": 0,
            "draft_tokens": 0,
            "draft_accepted": 0,
        }
        self.placement = Placement(
            self.model, self._slots, prompt_cache, self.cache_reuse, self.stats
        )
        self.decoding = Decoding(self.model, self.stats)
        self.costs = StepCosts()  # one sequence's: calibrated at load
        self._costs_by = {0: self.costs}  # by costs_bucket of the step's sequences
        self.acceptance = Acceptance()
        self.history = History()
        self._thread = threading.Thread(target=self._run, name="hostler-engine", daemon=True)
        self._thread.start()

    # -- the caller's side (any thread) ------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return self.model.tokenize(text, add_special=add_special)

    def token_text(self, token_id: int) -> str:
        return self.model.special_text(token_id)

    def grammar_error(self, grammar: str) -> str | None:
        return self.model.grammar_error(grammar)

    def submit(self, request: GenerationRequest) -> StepHandle:
        """Queue a request; raises QueueFullError when the wait queue is full."""
        with self._cond:
            self._check(request)
            request_id = next(self._ids)
            handle = StepHandle(self, request_id, request.n)
            self._queue(request_id, request, handle)
        return handle

    def submit_as(self, request: GenerationRequest, request_id: int) -> None:
        """Queue a request under the caller's id; its outputs go to the `deliver` sink
        (the engine process's way: the API process holds the handles)."""
        with self._cond:
            self._check(request)
            self._queue(request_id, request, None)

    def _check(self, request: GenerationRequest) -> None:
        if not request.prompt_tokens:
            # Nothing to decode: the slot would never produce logits to sample from.
            raise BadRequestError("the prompt is empty", param="prompt")
        if self._fatal:
            raise ServiceUnavailableError(f"the engine stopped: {self._fatal}")
        if self._stopping:
            raise ServiceUnavailableError("the server is shutting down")
        if self._queued >= self.max_queue:
            raise QueueFullError(
                "too many requests are waiting; try again shortly",
                headers={"Retry-After": "1"},
            )

    def _queue(
        self, request_id: int, request: GenerationRequest, handle: StepHandle | None
    ) -> None:
        first = Seq(request_id, 0, request, handle)
        seqs = [first] + [
            Seq(request_id, i, request, handle, parent=first) for i in range(1, request.n)
        ]
        self._incoming.append(seqs)
        self._queued += 1
        self._cond.notify()

    def cancel(self, request_id: int) -> None:
        with self._cond:
            self._cancelled.add(request_id)
            self._cond.notify()

    def health(self) -> dict[str, Any]:
        with self._cond:
            queued = self._queued
        now = time.monotonic()
        drafted = self.stats["draft_tokens"]
        return {
            "status": "error" if self._fatal else "ok",
            "slots": len(self._slots),
            "slots_busy": sum(1 for s in self._slots if s.seq is not None),
            "queued": queued,
            "n_ctx": self.model.n_ctx,
            **self.stats,
            "speculative": self.speculative,
            "draft_acceptance": (
                round(self.stats["draft_accepted"] / drafted, 3) if drafted else None
            ),
            "step_ms": self.costs.known() if self.speculative == "auto" else None,
            "step_ms_by_sequences": (
                {BUCKET_NAMES[b]: c.known() for b, c in sorted(self._costs_by.items())}
                if self.speculative == "auto"
                else None
            ),
            "draft_acceptance_by_match": self.acceptance.table() or None,
            "cache": self.cache.health() if self.cache is not None else None,
            "slot_list": [slot_view(s, now) for s in self._slots],
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
        if self.cache is not None and not self._thread.is_alive():
            # Keep what the slots hold for the next start (written to the disk tier).
            for slot in self._slots:
                self.placement.save(slot, 0)
            self.cache.close()
        self.model.close()

    # -- the engine thread ----------------------------------------------------------------

    def _calibrate(self) -> None:
        """Time decodes of 1 to 64 tokens, each with its logits (a verification's shape),
        before the first request: what a draft of k tokens costs (steps refine it)."""
        batch, token = self._batch, max(self.info.bos_id, 0)
        for n in (1, 1, 2, 2, 4, 4, 8, 8, 16, 16, 32, 32, 64, 64):  # the first warms up
            if n > self._n_batch:
                break
            batch.clear()
            batch.add_scored([token] * n, 0, 0)
            start = time.perf_counter()
            rc = self.model.decode(batch)
            self.model.synchronize()
            seconds = time.perf_counter() - start
            self.model.seq_rm(0, -1, -1)
            if rc != 0:
                break
            self.costs.observe(n, seconds)
        batch.clear()

    def _run(self) -> None:
        try:
            if self.speculative != "off":
                # On this thread: llama.cpp's CPU threads (an OpenMP team) belong to the
                # thread that decodes, and a team started elsewhere slows every step.
                self._calibrate()
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
                self._prune()
                self._admit()
                out.extend(self._step())
                self._prune()
                self._deliver(out)
                if stopping and not self._active and not self._waiting:
                    return
        except Exception as exc:  # pragma: no cover - a bug or a llama.cpp failure
            log.exception("engine thread failed")
            self._fatal = type(exc).__name__
            self._fail_all(str(exc))

    def _prune(self) -> None:
        """Drop the sequences that finished this step from the active list."""
        if any(s.finished for s in self._active):
            for s in self._active:
                if s.finished and s.drafter is not None:
                    self.history.add(s.drafter.index)  # later requests may copy it
            self._active = [s for s in self._active if not s.finished]

    def _unqueue(self, seq: Seq) -> None:
        """`seq` leaves the wait queue (admitted or ended)."""
        self._waiting.remove(seq)
        if seq.index == 0:
            with self._cond:
                self._queued -= 1

    def _finish_cancelled(self, cancelled: set[int], stopping: bool) -> list[tuple[Seq, SeqOutput]]:
        out: list[tuple[Seq, SeqOutput]] = []
        if not cancelled and not stopping:
            return out
        for seq in [*self._active, *self._waiting]:
            if stopping or seq.request_id in cancelled:
                if seq in self._waiting:
                    self._unqueue(seq)
                out.append((seq, self.decoding.finish(seq, "cancelled")))
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
            self._unqueue(seq)
            try:
                slot, keep = self.placement.place(seq, free)
            except Exception as exc:
                log.exception("could not start a sequence")
                self._deliver([(seq, self.decoding.finish(seq, "error", str(exc)))])
                continue
            slot.seq = seq
            slot.last_used = time.monotonic()
            seq.slot = slot
            seq.n_past = seq.cached = keep
            self.decoding.start(seq)
            seq.drafter = self._drafter(seq)
            self._active.append(seq)
            if not seq.request.announce:
                continue
            # Admitted: the caller learns the prompt and cached counts before the prefill
            # (Anthropic's message_start carries them; a long prefill sends nothing else).
            admitted = SeqOutput(
                index=seq.index,
                prompt_tokens=len(seq.request.prompt_tokens),
                cached_tokens=seq.cached,
            )
            self._deliver([(seq, admitted)])

    def _drafter(self, seq: Seq) -> Drafter | None:
        """An n-gram drafter for `seq`, unless speculation is off for it: off for the
        model, `speculative: false` in the request, or nothing it could ever draft."""
        wanted = seq.request.speculative
        mode = self.speculative
        if wanted is False or mode == "off" or seq.request.max_tokens < 2:
            return None
        # Greedy requests also copy from earlier ones. A sampled one drafts from its own
        # tokens only: the same seeded request alone then makes the same drafts, so the
        # same batches and the same text (another history would change the batches,
        # and a near-tie can go the other way in another batch: README, Speculative).
        history = self.history if seq.request.params.greedy else None
        index = NgramIndex(seq.request.prompt_tokens, history=history)
        return Drafter(index, forced=wanted or mode == "ngram")

    @staticmethod
    def _ready(seq: Seq) -> bool:
        # Extra choices (n > 1) wait for the first one's prefill, then copy its cache.
        return seq.parent is None or not seq.parent.prefilling or seq.parent.finished

    def _step(self) -> list[tuple[Seq, SeqOutput]]:
        if not self._active:
            return []
        batch = self._batch
        batch.clear()
        decoding = [s for s in self._active if not s.prefilling and s.slot is not None]
        drafts = self._drafts(decoding)
        sampling: list[tuple[Seq, int, list[int], int]] = []
        added: list[tuple[Seq, list[int]]] = []
        # Decoding sequences first: one token each (and its draft) keeps streams moving.
        for seq in decoding:
            assert seq.slot is not None
            draft, matched = drafts.get(seq, ([], 0))
            if draft:
                idx = batch.add_scored([seq.next_token, *draft], seq.n_past, seq.slot.id)
            else:
                idx = batch.add([seq.next_token], seq.n_past, seq.slot.id, True)
            sampling.append((seq, idx, draft, matched))
            added.append((seq, [seq.next_token]))
        for seq in self._active:
            if seq.prefilling and seq.slot is not None and batch.free > 0:
                prompt = seq.request.prompt_tokens
                chunk = prompt[seq.n_past : seq.n_past + batch.free]
                last = seq.n_past + len(chunk) == len(prompt)
                idx = batch.add(chunk, seq.n_past, seq.slot.id, last)
                added.append((seq, chunk))
                if last:
                    sampling.append((seq, idx, [], 0))
        if batch.n == 0:
            return []
        start = time.perf_counter()
        rc = self.model.decode(batch)
        if rc != 0:
            return self._decode_failed(rc)
        if self.speculative != "off" and len(added) == len(decoding):
            # A step of decode rows only (each with its logits, as drafts are): timed.
            self.model.synchronize()
            self._costs(len(decoding)).observe(batch.n, time.perf_counter() - start)
        self.stats["steps"] += 1
        for seq, tokens in added:
            assert seq.slot is not None
            seq.slot.tokens.extend(tokens)
            seq.n_past += len(tokens)
        out: list[tuple[Seq, SeqOutput]] = []
        for seq, idx, draft, matched in sampling:
            verify = draft and self._verify
            o = verify(seq, idx, draft, matched) if verify else self.decoding.sample(seq, idx)
            if o is not None:
                out.append((seq, o))
        return out

    def _costs(self, sequences: int) -> StepCosts:
        """The step costs of steps with `sequences` decoding (one table per bucket)."""
        b = costs_bucket(sequences)
        table = self._costs_by.get(b)
        if table is None:
            table = self._costs_by[b] = StepCosts(fallback=self.costs)
        return table

    def _drafts(self, decoding: list[Seq]) -> dict[Seq, tuple[list[int], int]]:
        """The step's drafts: each drafting sequence's n-gram continuation, as long as
        `plan` finds it pays (the batch's room left after pending prompt chunks)."""
        if self.speculative == "off":
            return {}
        candidates: list[tuple[Seq, list[int], int]] = []
        n_ctx = self.model.n_ctx
        for seq in decoding:
            drafter = seq.drafter
            if drafter is None or seq.forced or seq.finished:
                continue
            # Not past what the request may still generate, nor past the context.
            limit = min(
                MAX_DRAFT,
                seq.request.max_tokens - len(seq.generated) - 1,
                n_ctx - seq.n_past - 2,
            )
            draft, matched = drafter.index.draft(limit)
            if draft:
                candidates.append((seq, draft, matched))
        if not candidates:
            return {}
        prefill = sum(
            len(s.request.prompt_tokens) - s.n_past
            for s in self._active
            if s.prefilling and s.slot is not None
        )
        base = len(decoding) + min(prefill, self._n_batch - len(decoding))
        room = self._n_batch - base
        lengths = plan(
            [(s.drafter, d, m) for s, d, m in candidates if s.drafter is not None],
            base,
            len(decoding),
            room,
            self._costs(len(decoding)),
            self.acceptance,
        )
        return {seq: (d[:k], m) for (seq, d, m), k in zip(candidates, lengths, strict=True) if k}

    def _verify(self, seq: Seq, idx: int, draft: list[int], matched: int) -> SeqOutput | None:
        """Sample `seq` at its drafted rows in order, through the same `Decoding.sample`
        as plain decoding: a drafted token is kept while it is exactly the token sampled
        there (whose cell the batch already holds); the cells of the rest are removed.
        One output for everything it sampled."""
        assert seq.slot is not None and seq.drafter is not None
        slot = seq.slot
        outputs: list[SeqOutput] = []
        accepted = 0
        for i in range(len(draft) + 1):
            n_past = seq.n_past
            o = self.decoding.sample(seq, idx + i)
            if o is not None:
                outputs.append(o)
            if i == len(draft) or seq.finished or seq.n_past != n_past:
                break  # the last row, the end, or a rewind (a banned phrase)
            if seq.next_token != draft[i]:
                break  # the draft went another way from here
            slot.tokens.append(draft[i])
            seq.n_past += 1
            accepted += 1
        self.model.seq_rm(slot.id, seq.n_past, -1)
        seq.drafter.record(len(draft), accepted)
        self.acceptance.record(matched, len(draft), accepted)
        self.stats["draft_steps"] += 1
        self.stats["draft_tokens"] += len(draft)
        self.stats["draft_accepted"] += accepted
        if len(outputs) > 1:
            return merge_steps([[o] for o in outputs])[0]
        return outputs[0] if outputs else None

    def _decode_failed(self, rc: int) -> list[tuple[Seq, SeqOutput]]:
        """No room in the KV cache (rc 1): drop idle caches, else end the newest sequence."""
        out: list[tuple[Seq, SeqOutput]] = []
        if rc == 1:
            if self.placement.drop_idle():
                return out
            victim = self._active[-1]
            self._reset_slot(victim)
            out.append(
                (victim, self.decoding.finish(victim, "error", "the context (KV cache) is full"))
            )
            return out
        # Any other failure: the batch's sequences cannot continue.
        for seq in list(self._active):
            self._reset_slot(seq)
            out.append((seq, self.decoding.finish(seq, "error", f"llama_decode failed ({rc})")))
        return out

    def _reset_slot(self, seq: Seq) -> None:
        if seq.slot is not None:
            self.model.seq_rm(seq.slot.id, -1, -1)
            seq.slot.truncate(0)

    def _deliver(self, out: list[tuple[Seq, SeqOutput]]) -> None:
        """Hand the step's outputs to each request's loop: one call per loop per step."""
        if not out:
            return
        if self._sink is not None:
            by_id: dict[int, list[SeqOutput]] = {}
            for seq, o in out:
                by_id.setdefault(seq.request_id, []).append(o)
            self._sink(list(by_id.items()))
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[StepHandle, list[SeqOutput]]]] = {}
        by_handle: dict[StepHandle, list[SeqOutput]] = {}
        for seq, o in out:
            assert seq.handle is not None
            by_handle.setdefault(seq.handle, []).append(o)
        for handle, outputs in by_handle.items():
            by_loop.setdefault(handle._loop, []).append((handle, outputs))
        for loop, items in by_loop.items():
            # A closed loop means nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(dispatch, items)

    def _fail_all(self, message: str) -> None:
        with self._cond:
            for seqs in self._incoming:
                self._waiting.extend(seqs)
            self._incoming.clear()
        seqs = [*self._active, *self._waiting]
        out = [(seq, self.decoding.finish(seq, "error", message)) for seq in seqs]
        self._active.clear()
        self._waiting.clear()
        with self._cond:
            self._queued = 0
        self._deliver(out)
