"""Placement: which slot a new sequence takes, and how much of its prompt is already
in the KV cache there (the common prefix, chunks shifted into place, a prefix copied
from another slot, or a state restored from the prompt cache), saving what a slot is
about to lose. Runs at admission only, never per token."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from server.engine.cache import MIN_TOKENS, PromptCache
from server.engine.llama import LlamaModel
from server.engine.reuse import Chunk, plan_reuse, reused_tokens
from server.engine.sequence import Seq, Slot

# A cached state is restored only when it saves at least this many more tokens than the
# best live slot: restoring copies the whole state, not just the shared part.
MIN_RESTORE_GAIN = 32


def common_prefix(a: npt.NDArray[np.int32], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != np.asarray(b[:n], dtype=np.int32))
    return int(diff[0]) if diff.size else n


class Placement:
    def __init__(
        self,
        model: LlamaModel,
        slots: list[Slot],
        cache: PromptCache | None,
        cache_reuse: int,
        stats: dict[str, int],
    ) -> None:
        self.model = model
        self.slots = slots
        self.cache = cache
        self.cache_reuse = cache_reuse
        self.stats = stats

    def place(self, seq: Seq, free: list[Slot]) -> tuple[Slot, int]:
        """Put `seq` in a free slot, keeping as much of its prompt as is already known.

        Candidates: a free slot's common prefix (plus runs shifted into place, with
        chunk reuse), a prefix copied from any slot (`seq_cp`), or a state from the
        prompt cache. A slot about to lose most of what it holds is saved first.
        Returns the slot and how many prompt tokens it already holds.
        """
        prompt = seq.request.prompt_tokens
        arr = np.asarray(prompt, dtype=np.int32)
        last = len(prompt) - 1  # the last prompt token is always decoded, for its logits
        in_place, n_prefix, chunks = free[0], 0, []
        best = (-1, 0.0)
        for s in free:
            n = min(common_prefix(arr, s.tokens), last)
            plan = self._reuse_plan(s, arr, n)
            key = (reused_tokens(n, plan), -s.last_used)
            if key > best:
                best, in_place, n_prefix, chunks = key, s, n, plan
        n_in_place = best[0]
        donor, n_copy = None, 0
        for s in self.slots:
            if s is not in_place:
                n = min(common_prefix(arr, s.tokens), last)
                if n > n_copy:
                    donor, n_copy = s, n
        n_cache, entry = self.cache.best(arr) if self.cache is not None else (0, None)
        n_cache = min(n_cache, last)
        # The least valuable free slot: the emptiest, least recently used.
        spare = min(free, key=lambda s: (s is donor, len(s.tokens) > 0, s.last_used))
        keep = 0
        if entry is not None and n_cache >= max(n_in_place, n_copy) + MIN_RESTORE_GAIN:
            target = spare
            self.save(target, 0)
            keep = self._restore(target, entry, n_cache)
        elif donor is not None and n_copy > n_in_place:
            target = spare
            self.save(target, 0)
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
            self.save(target, n_in_place)
            keep = self._keep_in_place(target, arr, n_prefix, chunks)
        self.stats["requests"] += 1
        self.stats["cached_tokens"] += keep
        return target, keep

    def _reuse_plan(self, slot: Slot, prompt: npt.NDArray[np.int32], n: int) -> list[Chunk]:
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
        self, slot: Slot, prompt: npt.NDArray[np.int32], n: int, chunks: list[Chunk]
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

    def save(self, slot: Slot, keep: int) -> None:
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

    def _restore(self, slot: Slot, entry: Any, n: int) -> int:
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

    def drop_idle(self) -> bool:
        """Empty every idle slot (its state saved first): room in a full KV cache.
        False when no idle slot held anything."""
        idle = [s for s in self.slots if s.seq is None and s.tokens]
        for s in idle:
            self.save(s, 0)
            self.model.seq_rm(s.id, -1, -1)
            s.truncate(0)
        return bool(idle)
