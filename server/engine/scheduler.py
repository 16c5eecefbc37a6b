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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from server.engine.bans import BanTracker, Hit, RegexTimeout
from server.engine.cache import MIN_TOKENS, PromptCache
from server.engine.detokenizer import TextStream
from server.engine.llama import Batch, ContextOptions, LlamaModel
from server.engine.reuse import Chunk, plan_reuse, reused_tokens
from server.engine.sampling import GrammarDeadEnd, NoTokenLeft, SeqSampler, Snapshot
from server.engine.thinking import ThinkingGate
from server.engine.types import (
    FinishReason,
    GenerationRequest,
    ModelInfo,
    SeqOutput,
    TokenLogprob,
)
from server.errors import BadRequestError, QueueFullError, ServiceUnavailableError

log = logging.getLogger("hostler.engine")

# A choice that keeps forming banned phrases ends (cleanly, with a note) after this many
# rewinds, or this many bans at one position: it never loops.
MAX_REWINDS = 256
MAX_BANS_AT_POSITION = 64


class _Cancels(Protocol):
    def cancel(self, request_id: int) -> None: ...


class StepHandle:
    """The caller's side of a submitted request: an async iterator of step outputs (the
    engine process's parent side uses it too)."""

    def __init__(self, engine: _Cancels, request_id: int, n: int) -> None:
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
    handle: StepHandle | None
    """None in an engine process: outputs go to the engine's `deliver` sink."""
    parent: _Seq | None = None
    sampler: SeqSampler | None = None
    stream: TextStream = field(default_factory=TextStream)
    slot: _Slot | None = None
    n_past: int = 0  # tokens of this sequence in the KV cache
    cached: int = 0
    generated: list[int] = field(default_factory=list)
    next_token: int = -1  # sampled, not yet decoded
    finished: bool = False
    # Banned phrases (only when the request has some): the tracker holds back text that
    # could still become one; `held` are its tokens (id, logprob) not yet handed out.
    tracker: BanTracker | None = None
    held: list[tuple[int, TokenLogprob | None]] = field(default_factory=list)
    snapshots: dict[int, Snapshot] = field(default_factory=dict)
    """The sampler's state before each held position was sampled, to rewind to."""
    banned_at: dict[int, set[int]] = field(default_factory=dict)
    rewinds: int = 0
    thinking: ThinkingGate | None = None
    forced: list[int] = field(default_factory=list)
    """Tokens to decode next without sampling (a thinking budget's close tag)."""
    first_at: float = 0.0
    """When its first token was sampled (the status page's tok/s per slot)."""

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
    shared_until: int = 0
    """Cells below this position may be shared with another slot (`seq_cp` shares cells
    in a unified KV cache), so they must never be shifted."""

    def truncate(self, n: int) -> None:
        del self.tokens[n:]
        self.shared_until = min(self.shared_until, n)


# A cached state is restored only when it saves at least this many more tokens than the
# best live slot: restoring copies the whole state, not just the shared part.
MIN_RESTORE_GAIN = 32


def _slot_view(slot: _Slot, now: float) -> dict[str, Any]:
    """One slot for the status page: how many tokens its cells hold and, while busy, what
    its request has done (never any of its text)."""
    seq = slot.seq
    if seq is None:
        return {"id": slot.id, "busy": False, "tokens": len(slot.tokens)}
    generated = len(seq.generated)
    elapsed = now - seq.first_at
    rate = (generated - 1) / elapsed if generated > 1 and elapsed > 0 else None
    return {
        "id": slot.id,
        "busy": True,
        "tokens": len(slot.tokens),
        "phase": "prefill" if seq.prefilling else "decode",
        "prompt_tokens": len(seq.request.prompt_tokens),
        "cached_tokens": seq.cached,
        "generated": generated,
        "tok_s": None if rate is None else round(rate, 1),
    }


def _common_prefix(a: npt.NDArray[np.int32], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != np.asarray(b[:n], dtype=np.int32))
    return int(diff[0]) if diff.size else n


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
        deliver: Callable[[list[tuple[int, list[SeqOutput]]]], None] | None = None,
    ) -> None:
        self.model = LlamaModel(path, options)
        # Chunk reuse needs a memory whose cells can move (not recurrent state, not M-RoPE).
        self.cache_reuse = cache_reuse if self.model.can_shift() else 0
        self.cache = prompt_cache
        self.info: ModelInfo = self.model.info
        self.max_queue = max_queue
        self._slots = [_Slot(i) for i in range(options.slots)]
        self._batch = Batch(options.n_batch)
        self._n_batch = options.n_batch
        self._ids = itertools.count(1)
        self._sink = deliver
        """In an engine process: each step's outputs by request id, in one call."""
        self._cond = threading.Condition()
        self._incoming: deque[list[_Seq]] = deque()  # guarded by _cond
        self._cancelled: set[int] = set()  # guarded by _cond
        self._queued = 0  # requests submitted, not yet admitted; guarded by _cond
        self._waiting: deque[_Seq] = deque()  # engine thread only
        self._active: list[_Seq] = []  # engine thread only
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
        }
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
        first = _Seq(request_id, 0, request, handle)
        seqs = [first] + [
            _Seq(request_id, i, request, handle, parent=first) for i in range(1, request.n)
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
        return {
            "status": "error" if self._fatal else "ok",
            "slots": len(self._slots),
            "slots_busy": sum(1 for s in self._slots if s.seq is not None),
            "queued": queued,
            **self.stats,
            "cache": self.cache.health() if self.cache is not None else None,
            "slot_list": [_slot_view(s, now) for s in self._slots],
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
                self._save(slot, 0)
            self.cache.close()
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
                continue
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

    @staticmethod
    def _ready(seq: _Seq) -> bool:
        # Extra choices (n > 1) wait for the first one's prefill, then copy its cache.
        return seq.parent is None or not seq.parent.prefilling or seq.parent.finished

    def _place(self, seq: _Seq, free: list[_Slot]) -> None:
        """Put `seq` in a free slot, keeping as much of its prompt as is already known.

        Candidates: a free slot's common prefix (plus runs shifted into place, with
        chunk reuse), a prefix copied from any slot (`seq_cp`), or a state from the
        prompt cache. A slot about to lose most of what it holds is saved first.
        """
        prompt = seq.request.prompt_tokens
        arr = np.asarray(prompt, dtype=np.int32)
        last = len(prompt) - 1  # the last prompt token is always decoded, for its logits
        in_place, n_prefix, chunks = free[0], 0, []
        best = (-1, 0.0)
        for s in free:
            n = min(_common_prefix(arr, s.tokens), last)
            plan = self._reuse_plan(s, arr, n)
            key = (reused_tokens(n, plan), -s.last_used)
            if key > best:
                best, in_place, n_prefix, chunks = key, s, n, plan
        n_in_place = best[0]
        donor, n_copy = None, 0
        for s in self._slots:
            if s is not in_place:
                n = min(_common_prefix(arr, s.tokens), last)
                if n > n_copy:
                    donor, n_copy = s, n
        n_cache, entry = self.cache.best(arr) if self.cache is not None else (0, None)
        n_cache = min(n_cache, last)
        # The least valuable free slot: the emptiest, least recently used.
        spare = min(free, key=lambda s: (s is donor, len(s.tokens) > 0, s.last_used))
        keep = 0
        if entry is not None and n_cache >= max(n_in_place, n_copy) + MIN_RESTORE_GAIN:
            target = spare
            self._save(target, 0)
            keep = self._restore(target, entry, n_cache)
        elif donor is not None and n_copy > n_in_place:
            target = spare
            self._save(target, 0)
            self.model.seq_rm(target.id, -1, -1)
            target.tokens, target.shared_until = [], 0
            if n_copy > 0:
                self.model.seq_cp(donor.id, target.id, 0, n_copy)
                target.tokens = prompt[:n_copy]
                target.shared_until = n_copy
                donor.shared_until = max(donor.shared_until, n_copy)
            keep = n_copy
        else:
            target = in_place
            self._save(target, n_in_place)
            keep = self._keep_in_place(target, arr, n_prefix, chunks)
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
        if seq.request.bans is not None:
            seq.tracker = BanTracker(seq.request.bans)
        if seq.request.thinking is not None:
            seq.thinking = ThinkingGate(seq.request.thinking)
            seq.forced = list(seq.thinking.initial())
        self._active.append(seq)
        self.stats["requests"] += 1
        self.stats["cached_tokens"] += keep

    def _reuse_plan(self, slot: _Slot, prompt: npt.NDArray[np.int32], n: int) -> list[Chunk]:
        if not self.cache_reuse or len(slot.tokens) <= n:
            return []
        cached = np.asarray(slot.tokens, dtype=np.int32)
        plan = plan_reuse(cached, prompt, n, self.cache_reuse)
        # Cells that another slot may share must not move: stop before the first such run.
        for i, c in enumerate(plan):
            if c.src < slot.shared_until:
                return plan[:i]
        return plan

    def _keep_in_place(
        self, slot: _Slot, prompt: npt.NDArray[np.int32], n: int, chunks: list[Chunk]
    ) -> int:
        """Keep the slot's first `n` tokens and shift `chunks` into place; drop the rest."""
        head = n
        for c in chunks:
            # Drop what lies between (the trimmed messages), then move the run left.
            self.model.seq_rm(slot.id, head, c.src)
            self.model.seq_add(slot.id, c.src, c.src + c.n, c.dst - c.src)
            head = c.dst + c.n
        if not self.model.seq_rm(slot.id, head, -1):
            self.model.seq_rm(slot.id, -1, -1)  # this memory cannot cut a sequence
            slot.truncate(0)
            return 0
        if chunks:
            slot.tokens = prompt[:head].tolist()
            slot.shared_until = min(slot.shared_until, n)
            self.stats["reused_chunk_tokens"] += head - n
        else:
            slot.truncate(head)
        return head

    def _save(self, slot: _Slot, keep: int) -> None:
        """Save the slot's state to the prompt cache if it is about to lose much of it."""
        if self.cache is None or slot.seq is not None:
            return
        lost = len(slot.tokens) - keep
        if lost < max(MIN_TOKENS, len(slot.tokens) // 4):
            return
        tokens = np.asarray(slot.tokens, dtype=np.int32)
        if self.cache.covers(tokens):
            return
        self.cache.save(tokens, self.model.state_get(slot.id))

    def _restore(self, slot: _Slot, entry: Any, n: int) -> int:
        """Load a cached state into `slot` and keep its first `n` tokens; 0 if unusable."""
        assert self.cache is not None
        state = self.cache.state_of(entry)
        slot.tokens, slot.shared_until = [], 0
        if state is None:
            # An unusable entry: the slot starts empty (its old cells must not stay, or
            # the prefill's positions would collide with them).
            self.model.seq_rm(slot.id, -1, -1)
            return 0
        if not self.model.state_set(slot.id, state):
            return 0
        slot.tokens = entry.tokens[:n].tolist()
        if not self.model.seq_rm(slot.id, n, -1):
            self.model.seq_rm(slot.id, -1, -1)
            slot.tokens = []
            return 0
        self.stats["restored_tokens"] += n
        return n

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
        position = len(seq.generated)
        banned = seq.banned_at.get(position, ())
        if seq.tracker is not None:
            seq.snapshots[position] = seq.sampler.snapshot()
        try:
            if seq.forced and not seq.sampler.allows(seq.forced[0]):
                seq.forced.clear()  # a grammar that does not allow the close tag wins
            if seq.forced:
                token, logprob = seq.forced.pop(0), None
                seq.sampler.accept(token)
            else:
                token, logprob = seq.sampler.sample(idx, position, banned)
        except GrammarDeadEnd as exc:
            # A finished document whose end was banned ends here; otherwise the bans
            # excluded everything the grammar allows, which no token can satisfy.
            if exc.complete:
                return self._end(seq, "stop")
            if banned:
                return self._give_up(seq, position, "every token the grammar allows")
            return self._finish(seq, "error", str(exc))
        except NoTokenLeft:
            return self._give_up(seq, position, "every token")
        self.stats["tokens"] += 1
        if not seq.generated:
            seq.first_at = time.monotonic()
        seq.generated.append(token)
        seq.next_token = token
        eog = self.model.is_eog(token) or token in req.stop_token_ids
        if eog and not req.params.ignore_eos:
            o = self._end(seq, "stop")
            o.token_ids.append(token)
            if logprob is not None:
                o.logprobs = [*(o.logprobs or []), logprob]
            return o
        piece = self.model.piece(token, req.render_special)
        if seq.thinking is not None and seq.thinking.state != "done":
            seq.forced.extend(seq.thinking.push(piece.decode("utf-8", "ignore")))
        tokens: list[int] = [token]
        logprobs: list[TokenLogprob] | None = [logprob] if logprob is not None else None
        if seq.tracker is None:
            text = seq.stream.push(piece)
        else:
            seq.held.append((token, logprob))
            try:
                hit = seq.tracker.push(piece)
                if hit is not None:
                    return self._rewind(seq, hit)
                n, data = seq.tracker.release()
            except RegexTimeout as exc:
                return self._finish(seq, "error", str(exc))
            tokens, logprobs = self._take_held(seq, n)
            text = seq.stream.push(data) if n else ""
        finish: FinishReason | None = None
        if seq.stream.stopped:
            finish = "stop"
        elif len(seq.generated) >= req.max_tokens or seq.n_past + 1 >= self.model.n_ctx:
            finish = "length"
        if finish is not None:
            o = self._end(seq, finish)
            o.text = text + o.text
            o.token_ids = tokens + o.token_ids
            if logprobs is not None or o.logprobs is not None:
                o.logprobs = (logprobs or []) + (o.logprobs or [])
            return o
        return SeqOutput(
            index=seq.index,
            text=text,
            token_ids=tokens,
            logprobs=logprobs,
            prompt_tokens=len(req.prompt_tokens),
            cached_tokens=seq.cached,
            completion_tokens=len(seq.generated),
        )

    def _take_held(self, seq: _Seq, n: int) -> tuple[list[int], list[TokenLogprob] | None]:
        """The first `n` held tokens, now released: their ids and logprobs."""
        taken, seq.held = seq.held[:n], seq.held[n:]
        assert seq.tracker is not None
        for position in [p for p in seq.snapshots if p < seq.tracker.released]:
            seq.snapshots.pop(position).free()
        logprobs = [lp for _, lp in taken if lp is not None]
        return [t for t, _ in taken], (logprobs or None)

    def _end(self, seq: _Seq, reason: FinishReason, note: str | None = None) -> SeqOutput:
        """Finish normally: what the ban tracker still holds goes out first."""
        tokens: list[int] = []
        logprobs: list[TokenLogprob] | None = None
        text = ""
        if seq.tracker is not None:
            n, data = seq.tracker.flush()
            tokens, logprobs = self._take_held(seq, n)
            if not seq.stream.stopped:
                text = seq.stream.push(data)
        o = self._finish(seq, reason, note=note)
        o.text = text + o.text
        o.token_ids = tokens
        o.logprobs = logprobs
        return o

    def _rewind(self, seq: _Seq, hit: Hit) -> SeqOutput | None:
        """A banned phrase formed: go back to the token where it began, ban that token
        there, and sample again (the next step re-decodes the token before it)."""
        assert seq.tracker is not None and seq.sampler is not None and seq.slot is not None
        at = hit.token
        seq.rewinds += 1
        bans = seq.banned_at.setdefault(at, set())
        bans.add(seq.generated[at])
        if seq.rewinds > MAX_REWINDS or len(bans) > MAX_BANS_AT_POSITION:
            return self._give_up(seq, at, repr(hit.phrase))
        n_prompt = len(seq.request.prompt_tokens)
        pos = n_prompt + at - 1  # the cell whose logits sample position `at`
        if not self.model.seq_rm(seq.slot.id, pos, -1):
            return self._give_up(seq, at, repr(hit.phrase))  # this memory cannot cut
        seq.slot.truncate(pos)
        for position in [p for p in seq.banned_at if p > at]:
            del seq.banned_at[position]
        seq.sampler.restore(seq.snapshots.pop(at))
        for position in [p for p in seq.snapshots if p > at]:
            seq.snapshots.pop(position).free()
        del seq.held[at - seq.tracker.released :]
        seq.tracker.rewind(at)
        seq.next_token = seq.generated[at - 1] if at > 0 else seq.request.prompt_tokens[-1]
        del seq.generated[at:]
        seq.n_past = pos
        self.stats["ban_rewinds"] += 1
        return None

    def _give_up(self, seq: _Seq, at: int, what: str) -> SeqOutput:
        """End a choice before position `at`, where a banned phrase cannot be avoided."""
        assert seq.tracker is not None
        del seq.held[at - seq.tracker.released :]
        seq.tracker.rewind(at)
        del seq.generated[at:]
        note = f"banned_string: could not avoid {what} after {seq.rewinds} rewinds"
        return self._end(seq, "stop", note)

    def _finish(
        self,
        seq: _Seq,
        reason: FinishReason,
        error: str | None = None,
        note: str | None = None,
    ) -> SeqOutput:
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
        for snap in seq.snapshots.values():
            snap.free()
        seq.snapshots.clear()
        if seq.sampler is not None:
            seq.sampler.close()
        return SeqOutput(
            index=seq.index,
            text=tail,
            finish_reason=reason,
            error=error,
            note=note,
            prompt_tokens=len(seq.request.prompt_tokens),
            cached_tokens=seq.cached,
            stop_string=seq.stream.matched,
            completion_tokens=len(seq.generated),
        )

    def _decode_failed(self, rc: int) -> list[tuple[_Seq, SeqOutput]]:
        """No room in the KV cache (rc 1): drop idle caches, else end the newest sequence."""
        out: list[tuple[_Seq, SeqOutput]] = []
        if rc == 1:
            idle = [s for s in self._slots if s.seq is None and s.tokens]
            if idle:
                for s in idle:
                    self._save(s, 0)
                    self.model.seq_rm(s.id, -1, -1)
                    s.truncate(0)
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
            seq.slot.truncate(0)

    def _deliver(self, out: list[tuple[_Seq, SeqOutput]]) -> None:
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
            m.note = o.note or m.note
            m.stop_string = o.stop_string or m.stop_string
            m.prompt_tokens = o.prompt_tokens
            m.cached_tokens = o.cached_tokens
            m.completion_tokens = o.completion_tokens
    return list(merged.values())


def dispatch(items: list[tuple[StepHandle, list[SeqOutput]]]) -> None:
    for handle, outputs in items:
        handle._put(outputs)
