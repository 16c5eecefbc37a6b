"""Draft-free speculation: each decoding sequence may propose the tokens that followed
the last time its last few tokens appeared (in its prompt or its own output), and the
target model checks them all in the step's one batch.

- `NgramIndex`: where each n-gram of a sequence's tokens last ended, kept up to date
  token by token (O(1) each; the prompt is indexed once at admission).
- `StepCosts`: how long a decode of n tokens takes on this model and machine, measured
  at load and then from every step.
- `Acceptance`: how often a drafted token is kept, by the length of the match behind it,
  learned from every draft.
- `plan` decides, for a whole step, which sequences draft how many tokens: only where
  the expected kept tokens buy more than the extra rows cost (auto), always (ngram) or
  never (off).

Verification itself (engine/scheduler.py) runs the request's own sampler chain at each
drafted position through the same `Decoding.sample` as plain decoding and keeps a token
only while the sampled token equals the draft, so the output is exactly plain decoding's.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["auto", "off", "ngram"]

NGRAM = 4
"""Tokens that must match to draft: short enough to pick a copy up again soon after an
edit, long enough that prose rarely matches by chance."""
MAX_DRAFT = 64
"""Tokens one sequence may draft in a step (a long verbatim copy drafts long: on a CPU a
drafted row costs a fraction of a decode step)."""
MAX_MATCH = 64
"""How far back a match is measured: the longer it is, the likelier the copy goes on."""
AUTO_MIN_MATCH = 8
"""In auto mode a sequence drafts only behind a match at least this long: chance matches
of a few tokens (common phrases in prose) are mostly rejected, and each rejected row is
a cost plain decoding never pays. A copy with edits every dozen tokens (a rename in a
code file) must still draft between them, so this stays short (llama-server's ngram-mod
waits for 24 and misses those)."""
MARGIN = 1.05
"""A plan must promise this much more throughput than plain decoding (costs are noisy)."""
SAMPLES = 16
"""Step times kept per batch size (the fastest is the estimate)."""
PRIOR_WEIGHT = 2.0
"""Tokens' worth of trust in the engine's acceptance table before a sequence's own
drafts say otherwise."""


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

    def draft(self, limit: int) -> tuple[list[int], int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the last
        n tokens, and how many tokens before them match there (at least n, at most
        MAX_MATCH); ([], 0) when the last n tokens never occurred before."""
        toks = self.tokens
        if len(toks) < self.n or limit <= 0:
            return [], 0
        end = self._after.get(tuple(toks[-self.n :]))
        if end is None:
            return [], 0
        matched, top = self.n, min(MAX_MATCH, end)
        while matched < top and toks[-1 - matched] == toks[end - 1 - matched]:
            matched += 1
        return toks[end : end + limit], matched


@dataclass
class Drafter:
    """One sequence's n-gram index and what its drafts gave: its own acceptance, which
    corrects the engine's table for this text (a story after many edits drafts little)."""

    index: NgramIndex
    forced: bool = False
    """Draft whenever there is a match (mode ngram, or the request asked for it)."""
    drafted: int = 0
    accepted: int = 0
    trials: float = 0.0
    kept: float = 0.0

    def record(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        self.trials += min(drafted, accepted + 1)
        self.kept += accepted

    def scale(self, engine_rate: float) -> float:
        """This sequence's kept rate over what the engine's table predicted for it so
        far, with PRIOR_WEIGHT tokens of the engine's own word (1: as predicted)."""
        own = (self.kept + PRIOR_WEIGHT * engine_rate) / (self.trials + PRIOR_WEIGHT)
        return own / engine_rate if engine_rate > 0 else 1.0


class Acceptance:
    """How often a drafted token is accepted, by how long the match behind it is (the
    match grows by one with each token of a draft): learned by the engine from every
    draft, so a new sequence starts from what this model and its users' texts do. A
    copy (long matches) keeps drafting long while prose (short chance matches) stops."""

    BUCKET = 4

    def __init__(self) -> None:
        n = MAX_MATCH // self.BUCKET + 2
        self._trials = [0.0] * n
        self._kept = [0.0] * n

    def _bucket(self, matched: int) -> int:
        return min(matched, MAX_MATCH + self.BUCKET) // self.BUCKET

    def rate(self, matched: int) -> float:
        b = self._bucket(matched)
        return (self._kept[b] + 1) / (self._trials[b] + 2)  # a prior of one in two

    def record(self, matched: int, drafted: int, accepted: int) -> None:
        """A draft behind a match of `matched` tokens: its first `accepted` tokens were
        kept; the one after them (if any) was the first rejected."""
        for i in range(min(drafted, accepted + 1)):
            b = self._bucket(matched + i)
            # Old evidence fades, so the table follows what the server is used for now.
            self._trials[b] = 0.995 * self._trials[b] + 1
            self._kept[b] = 0.995 * self._kept[b] + (1 if i < accepted else 0)

    def expected(self, matched: int, k: int, scale: float = 1.0) -> list[float]:
        """Tokens expected to be kept from drafts of 1..k tokens (a token counts only if
        all before it were kept); `scale` corrects each token's rate for one sequence."""
        out, total, p = [], 0.0, 1.0
        for i in range(k):
            p *= min(self.rate(matched + i) * scale, 1.0)
            total += p
            out.append(total)
        return out

    def table(self) -> dict[str, float]:
        return {
            f"{b * self.BUCKET}+": round(self.rate(b * self.BUCKET), 3)
            for b in range(len(self._trials))
            if self._trials[b] >= 1
        }


@dataclass
class StepCosts:
    """Seconds a decode of n tokens takes (each with its logits), as one step plus a cost
    per extra token: t(n) = t(1) + slope * (n - 1). Each size's time is the fastest of its
    last SAMPLES steps (a step is only ever slowed: by a size's first graph, another
    thread holding the GIL, a shared machine); the slope is the median over the sizes
    measured of (t(n) - t(1)) / (n - 1)."""

    _samples: dict[int, deque[float]] = field(default_factory=dict)
    _median: dict[int, float] = field(default_factory=dict)
    _one: float | None = None
    _slope: float | None = None

    def observe(self, n: int, seconds: float) -> None:
        kept = self._samples.get(n)
        if kept is None:
            kept = self._samples[n] = deque(maxlen=SAMPLES)
        kept.append(seconds)
        self._median[n] = min(kept)
        self._fit()

    def _fit(self) -> None:
        one = self._median.get(1)
        if one is None:
            return
        slopes = [(t - one) / (n - 1) for n, t in self._median.items() if n > 1]
        self._one = one
        self._slope = max(statistics.median(slopes), 0.0) if slopes else None

    def estimate(self, n: int) -> float | None:
        """t(n): between two measured sizes, the line through them (a batch's cost grows
        more slowly than its rows on many machines); past the largest, that size's time
        plus the fitted slope per extra token."""
        if self._one is None or (n > 1 and self._slope is None):
            return None
        sizes = sorted(self._median)
        if n in self._median:
            return self._median[n]
        below = max((m for m in sizes if m < n), default=None)
        above = min((m for m in sizes if m > n), default=None)
        if below is not None and above is not None:
            t0, t1 = self._median[below], self._median[above]
            return t0 + (t1 - t0) * (n - below) / (above - below)
        base = below if below is not None else 1
        return self._median.get(base, self._one) + (self._slope or 0.0) * (n - base)

    def known(self) -> dict[str, float]:
        out = {str(n): round(t * 1000, 3) for n, t in sorted(self._median.items())}
        if self._slope is not None:
            out["per_extra_token"] = round(self._slope * 1000, 3)
        return out


def plan(
    candidates: list[tuple[Drafter, list[int], int]],
    base_tokens: int,
    base_outputs: int,
    room: int,
    costs: StepCosts,
    acceptance: Acceptance,
) -> list[int]:
    """How many tokens of its draft each candidate (drafter, draft, match length) puts
    in this step (0: none).

    `base_tokens` are the step's tokens without drafts (one per decoding sequence, plus
    prompt chunks), `base_outputs` the tokens it yields (one per decoding sequence) and
    `room` the batch's free rows. A forced drafter takes what it has; the others are
    taken one by one, each with the length that most raises the step's expected tokens
    per second, and only where that beats the step without it by MARGIN (and only
    behind a match of AUTO_MIN_MATCH tokens or more).
    """
    out = [0] * len(candidates)
    tokens, outputs = base_tokens, float(base_outputs)
    for i, (drafter, draft, matched) in enumerate(candidates):
        limit = min(len(draft), MAX_DRAFT, room)
        if limit <= 0 or (not drafter.forced and matched < AUTO_MIN_MATCH):
            continue
        scale = drafter.scale(acceptance.rate(matched))
        gains = acceptance.expected(matched, limit, scale)
        if drafter.forced:
            k = min(limit, matched)  # as long as the match behind it: a guess that grows
        else:
            now = costs.estimate(tokens)
            if now is None:
                continue
            best_rate, k = outputs / now * MARGIN, 0
            for j in range(1, limit + 1):
                cost = costs.estimate(tokens + j)
                if cost is None or cost <= 0:
                    break
                rate = (outputs + gains[j - 1]) / cost
                if rate > best_rate:
                    best_rate, k = rate, j
            if k == 0:
                continue
        outputs += gains[k - 1]
        out[i] = k
        tokens += k
        room -= k
    return out
