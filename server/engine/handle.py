"""The caller's side of a submitted request: an async iterator of step outputs, fed by
the engine thread one call per event loop per step (the engine process's parent side
feeds it from its reader thread)."""

from __future__ import annotations

import asyncio
import dataclasses
import weakref
from collections.abc import AsyncIterator
from typing import Protocol

from server.engine.types import SeqOutput


class Cancels(Protocol):
    def cancel(self, request_id: int) -> None: ...


class StepHandle:
    """The caller's side of a submitted request: an async iterator of step outputs (the
    engine process's parent side uses it too)."""

    def __init__(self, engine: Cancels, request_id: int, n: int) -> None:
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
            m.drafted = max(m.drafted, o.drafted)
            m.accepted = max(m.accepted, o.accepted)
    return list(merged.values())


def dispatch(items: list[tuple[StepHandle, list[SeqOutput]]]) -> None:
    for handle, outputs in items:
        handle._put(outputs)
