"""Draft-free speculation: each decoding sequence may propose the tokens that followed
the last time its last few tokens appeared (in its prompt or its own output), and the
target model checks them all in the step's one batch.

- `NgramIndex`: where each n-gram of a sequence's tokens last ended, kept up to date
  token by token (O(1) each; the prompt is indexed once at admission).
- `StepCosts`: how long a decode of n tokens takes on this model and machine, measured
  at load and then from every step.
- `Acceptance`: how far a draft runs before its first rejected token, by the length of
  the match behind it, learned from every draft (and explored while it knows little).
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
AUTO_MIN_MATCH = NGRAM
"""In auto mode a sequence may draft behind any n-gram match: the learned table (by match
length) and the step costs decide whether it pays. A copy with edits every dozen tokens
(a rename in a code file) must draft between them, right after the match picks up again
(llama-server's ngram-mod waits for 24 tokens and misses those)."""
MARGIN = 1.15
"""A plan must promise this much more throughput than plain decoding: step costs are the
fastest of recent samples and acceptance an average, so a thin margin drafts where it
only breaks even (with 1.05, prose and 8 streams measured 0.95-0.96x plain here)."""
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
    """How long a draft runs before its first rejected token, by the length of the match
    it starts behind: learned by the engine from every draft, so a new sequence starts
    from what this model and its users' texts do.

    Kept as a hazard per position in the draft (how often the i-th token is the first
    rejected, given the ones before it were kept), not as one rate per token: a copy is
    bimodal (a draft that starts at an edit fails at once; one that starts in a verbatim
    stretch runs to its end), which a single per-token rate, multiplied out, would
    mistake for drafts that decay quickly, and so never draft the long runs that pay."""

    POSITIONS = (0, 1, 2, 3, 4, 8, 16, 32)
    """Where each position bin starts (later positions share a bin: fewer trials)."""
    STARTS = (4, 8, 16, 32, 64, 128)
    """The shortest match of each match bucket (0: under 8, then powers of two)."""
    EXPLORE = 16
    """Drafts behind a match bucket before its table is trusted: until then auto drafts
    as forced drafting would, to learn (only behind AUTO_MIN_MATCH tokens or more)."""
    REVISIT = 64
    """Declined drafts behind a bucket after which one is tried anyway, so a table made
    pessimistic by one kind of text (prose) learns again when another (code) comes."""

    def __init__(self) -> None:
        n, buckets = len(self.POSITIONS), len(self.STARTS)
        self._trials = [[0.0] * n for _ in range(buckets)]
        self._rejects = [[0.0] * n for _ in range(buckets)]
        self._drafts = [0] * buckets
        self._declined = [0] * buckets

    @classmethod
    def _bucket(cls, matched: int) -> int:
        """0: under 8, 1: 8-15, 2: 16-31, 3: 32-63, 4: 64-127, 5: longer."""
        return min(matched.bit_length() - 3, len(cls.STARTS) - 1) if matched >= 8 else 0

    @staticmethod
    def _pos(i: int) -> int:
        return _POSITION_BIN[min(i, MAX_DRAFT - 1)]

    def hazard(self, matched: int, i: int) -> float:
        """How often the draft's i-th token is the first rejected, given the ones before
        it were kept (a prior of one in two)."""
        b, p = self._bucket(matched), self._pos(i)
        return (self._rejects[b][p] + 1) / (self._trials[b][p] + 2)

    def rate(self, matched: int) -> float:
        """How often a draft's first token is kept."""
        return 1.0 - self.hazard(matched, 0)

    def exploring(self, matched: int) -> bool:
        """Too few drafts behind this match length to trust the table (or too many
        declined since the last): draft anyway, to learn."""
        b = self._bucket(matched)
        return self._drafts[b] < self.EXPLORE or self._declined[b] >= self.REVISIT

    def declined(self, matched: int) -> None:
        self._declined[self._bucket(matched)] += 1

    def record(self, matched: int, drafted: int, accepted: int) -> None:
        """A draft of `drafted` tokens behind a match of `matched`: its first `accepted`
        tokens were kept; the one after them (if any) was the first rejected."""
        b = self._bucket(matched)
        self._drafts[b] += 1
        self._declined[b] = 0
        trials, rejects = self._trials[b], self._rejects[b]
        for i in range(min(drafted, accepted + 1)):
            p = self._pos(i)
            # Old evidence fades, so the table follows what the server is used for now.
            trials[p] = 0.995 * trials[p] + 1
            rejects[p] = 0.995 * rejects[p] + (1 if i == accepted else 0)

    def expected(self, matched: int, k: int, scale: float = 1.0) -> list[float]:
        """Tokens expected to be kept from drafts of 1..k tokens (a token counts only if
        all before it were kept); `scale` corrects the odds for one sequence."""
        out, total, survive = [], 0.0, 1.0
        for i in range(k):
            survive *= min((1.0 - self.hazard(matched, i)) * scale, 1.0)
            total += survive
            out.append(total)
        return out

    def table(self) -> dict[str, float]:
        """Per match bucket that has drafted: the first token's keep rate."""
        return {
            f"{start}+": round(self.rate(start), 3)
            for b, start in enumerate(self.STARTS)
            if self._trials[b][0] >= 1
        }


_POSITION_BIN = tuple(
    max(b for b, start in enumerate(Acceptance.POSITIONS) if i >= start) for i in range(MAX_DRAFT)
)
"""A draft position's bin, computed once (the policy asks for every position, every step)."""


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
            plain = outputs / now * MARGIN
            if acceptance.exploring(matched):
                # Learning: the forced length, if it would pay were it all kept.
                k = min(limit, matched)
                cost = costs.estimate(tokens + k)
                if cost is None or (outputs + k) / cost <= plain:
                    continue
            else:
                k = _best_length(gains, tokens, outputs, plain, costs)
                if k == 0:
                    acceptance.declined(matched)
                    continue
        outputs += gains[k - 1]
        out[i] = k
        tokens += k
        room -= k
    return out


def _best_length(
    gains: list[float], tokens: int, outputs: float, plain: float, costs: StepCosts
) -> int:
    """The draft length whose expected tokens per second beat `plain` the most (0: none)."""
    best_rate, k = plain, 0
    for j in range(1, len(gains) + 1):
        cost = costs.estimate(tokens + j)
        if cost is None or cost <= 0:
            break
        rate = (outputs + gains[j - 1]) / cost
        if rate > best_rate:
            best_rate, k = rate, j
    return k
