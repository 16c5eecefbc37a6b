"""Draft-free speculation: each decoding sequence may propose the tokens that followed
the last time its last few tokens appeared (in its prompt or its own output), and the
target model checks them all in the step's one batch.

- `NgramIndex`: where each n-gram of a sequence's tokens last ended, kept up to date
  token by token (O(1) each; the prompt is indexed once at admission).
- `StepCosts`: how long a decode of n tokens takes on this model and machine, measured
  at load and then from every step.
- `Drafter`: one sequence's index and its measured acceptance; `plan` decides, for a
  whole step, which sequences draft how many tokens: only where the expected accepted
  tokens buy more than the extra rows cost (auto), always (ngram) or never (off).

Verification itself (engine/scheduler.py) runs the request's own sampler chain at each
drafted position through the same `Decoding.sample` as plain decoding and keeps a token
only while the sampled token equals the draft, so the output is exactly plain decoding's.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["auto", "off", "ngram"]
MODES: tuple[Mode, ...] = ("auto", "off", "ngram")

NGRAM = 4
"""Tokens that must match to draft: short enough to pick a copy up again soon after an
edit, long enough that prose rarely matches by chance."""
MAX_DRAFT = 16
"""Tokens one sequence may draft in a step."""
PRIOR = 0.5
"""A new sequence's per-token acceptance, before it has drafted; a sequence that has not
drafted for a while drifts back to it (so one that starts copying late is tried again)."""
MEMORY = 0.8
"""How much of its acceptance estimate a sequence keeps per drafted token."""
RELAX = 0.03
"""How far the estimate moves back towards PRIOR per token decoded without a draft."""
MARGIN = 1.03
"""A plan must promise this much more throughput than plain decoding (costs are noisy)."""


class NgramIndex:
    """Where each NGRAM-gram of `tokens` last ended (only those with a token after)."""

    def __init__(self, tokens: Sequence[int], n: int = NGRAM) -> None:
        self.n = n
        self.tokens: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}
        self._build(tokens)

    def _build(self, tokens: Sequence[int]) -> None:
        n = self.n
        toks = self.tokens = list(tokens)
        after = self._after = {}
        for end in range(n, len(toks)):
            after[tuple(toks[end - n : end])] = end

    def push(self, token: int) -> None:
        toks = self.tokens
        toks.append(token)
        end = len(toks) - 1
        if end >= self.n:
            self._after[tuple(toks[end - self.n : end])] = end

    def truncate(self, length: int) -> None:
        """Forget tokens from `length` on (a banned phrase rewound them): rebuilt."""
        if length < len(self.tokens):
            self._build(self.tokens[:length])

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the last
        n tokens; [] when they never occurred before."""
        toks = self.tokens
        if len(toks) < self.n or limit <= 0:
            return []
        end = self._after.get(tuple(toks[-self.n :]))
        if end is None:
            return []
        return toks[end : end + limit]


@dataclass
class Drafter:
    """One sequence's n-gram index and how often its drafts are accepted."""

    index: NgramIndex
    forced: bool = False
    """Draft whenever there is a match (mode ngram, or the request asked for it)."""
    alpha: float = PRIOR
    drafted: int = 0
    accepted: int = 0

    def record(self, drafted: int, accepted: int) -> None:
        """A draft of `drafted` tokens, of which the first `accepted` were kept."""
        self.drafted += drafted
        self.accepted += accepted
        for _ in range(accepted):
            self.alpha = MEMORY * self.alpha + (1 - MEMORY)
        if accepted < drafted:
            self.alpha = MEMORY * self.alpha

    def idle(self) -> None:
        """A token decoded without a draft: the estimate drifts back towards PRIOR."""
        self.alpha += (PRIOR - self.alpha) * RELAX


def expected(alpha: float, k: int) -> float:
    """Tokens expected to be accepted from a draft of k: alpha + alpha^2 + ... + alpha^k
    (a token counts only if all before it were accepted)."""
    if alpha >= 1.0:
        return float(k)
    return alpha * (1 - alpha**k) / (1 - alpha)


@dataclass
class StepCosts:
    """Seconds a decode of n tokens takes (each with its logits), by n: a moving average
    per n measured, linear between the sizes measured, linear beyond the largest."""

    _sizes: list[int] = field(default_factory=list)
    _seconds: dict[int, float] = field(default_factory=dict)

    def observe(self, n: int, seconds: float) -> None:
        old = self._seconds.get(n)
        if old is None:
            bisect.insort(self._sizes, n)
            self._seconds[n] = seconds
        else:
            self._seconds[n] = 0.8 * old + 0.2 * seconds

    def estimate(self, n: int) -> float | None:
        sizes = self._sizes
        if not sizes:
            return None
        if n in self._seconds:
            return self._seconds[n]
        i = bisect.bisect_left(sizes, n)
        if i == 0:
            return self._seconds[sizes[0]]
        if i == len(sizes):
            if len(sizes) == 1:
                return self._seconds[sizes[0]] * n / sizes[0]
            a, b = sizes[-2], sizes[-1]
        else:
            a, b = sizes[i - 1], sizes[i]
        ta, tb = self._seconds[a], self._seconds[b]
        return ta + (tb - ta) * (n - a) / (b - a)

    def known(self) -> dict[int, float]:
        return {n: round(self._seconds[n] * 1000, 3) for n in self._sizes}


def plan(
    candidates: list[tuple[Drafter, list[int]]],
    base_tokens: int,
    base_outputs: int,
    room: int,
    costs: StepCosts,
) -> list[int]:
    """How many of its draft each candidate puts in this step (0: none).

    `base_tokens` are the step's tokens without drafts (one per decoding sequence, plus
    prompt chunks), `base_outputs` the tokens it yields (one per decoding sequence) and
    `room` the batch's free rows. A forced drafter takes what it has; the others are
    taken one by one, each with the length that most raises the step's expected
    tokens per second, and only where that beats the step without it by MARGIN.
    """
    out = [0] * len(candidates)
    tokens, outputs = base_tokens, float(base_outputs)
    for i, (drafter, draft) in enumerate(candidates):
        if room <= 0:
            break
        limit = min(len(draft), MAX_DRAFT, room)
        if limit <= 0:
            continue
        if drafter.forced:
            k = limit
        else:
            now = costs.estimate(tokens)
            if now is None:
                continue
            best_rate, k = outputs / now * MARGIN, 0
            for j in range(1, limit + 1):
                cost = costs.estimate(tokens + j)
                if cost is None or cost <= 0:
                    break
                rate = (outputs + expected(drafter.alpha, j)) / cost
                if rate > best_rate:
                    best_rate, k = rate, j
            if k == 0:
                continue
        outputs += expected(drafter.alpha, k)
        out[i] = k
        tokens += k
        room -= k
    return out
