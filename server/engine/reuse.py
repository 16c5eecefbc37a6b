"""Chunk reuse: after the common prefix, runs of the new prompt still held in a slot.

When a frontend trims a chat (drops the oldest messages, keeps the character card), the
new prompt is the card, then messages the slot already holds at later positions, then
something new. The runs found here are kept and shifted left into place
(`llama_memory_seq_rm` + `llama_memory_seq_add`) instead of being prefilled again.

This is an approximation, as KoboldCpp's ContextShift and llama-server's `--cache-reuse`
are: the kept cells were computed with the dropped text in view.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt

Tokens = npt.NDArray[np.int32]


class Chunk(NamedTuple):
    src: int  # position of the run in the slot's cells
    dst: int  # position of the run in the new prompt (dst <= src: a left shift)
    n: int


def _first_run(cached: Tokens, prompt: Tokens, head_c: int, head_p: int, min_run: int) -> int:
    """The first position j >= head_c where cached[j:j+min_run] == prompt[head_p:+min_run]."""
    want = prompt[head_p : head_p + min_run]
    if len(want) < min_run:
        return -1
    hay = cached[head_c:]
    cand = np.flatnonzero(hay[: len(hay) - min_run + 1] == want[0])
    for k in range(1, min_run):
        if cand.size == 0:
            return -1
        cand = cand[hay[cand + k] == want[k]]
    return head_c + int(cand[0]) if cand.size else -1


def plan_reuse(cached: Tokens, prompt: Tokens, start: int, min_run: int) -> list[Chunk]:
    """Runs of at least `min_run` tokens, in order, that move `prompt` forward from `start`.

    The same greedy walk as llama-server's cache reuse: at each point of the prompt, the
    next place in the cache where a long enough run begins; take the whole run.
    """
    chunks: list[Chunk] = []
    if min_run <= 0:
        return chunks
    head_c = head_p = start
    # The last prompt token is always decoded (its logits start generation).
    limit_p = len(prompt) - 1
    while head_c < len(cached) and head_p < limit_p:
        j = _first_run(cached, prompt[:limit_p], head_c, head_p, min_run)
        if j < 0:
            break
        m = min(len(cached) - j, limit_p - head_p)
        same = cached[j : j + m] == prompt[head_p : head_p + m]
        n = m if same.all() else int(np.argmin(same))
        chunks.append(Chunk(j, head_p, n))
        head_c, head_p = j + n, head_p + n
    return chunks


def reused_tokens(start: int, chunks: list[Chunk]) -> int:
    """How many prompt tokens are in place after applying `chunks` from `start`."""
    return chunks[-1].dst + chunks[-1].n if chunks else start
