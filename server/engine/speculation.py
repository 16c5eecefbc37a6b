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

import bisect
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
MAX_MATCH = 256
"""How far back a match is measured: the longer it is, the likelier the copy goes on
(and an earlier request sent again matches far back)."""
HISTORY = 8
"""Finished sequences per model whose tokens later sequences may copy from."""
OCCURRENCES = 8
"""Earlier occurrences of each n-gram kept, to choose the one with the longest match."""
RESYNC = 2
"""Tokens after an edit that must follow the source again to pick the copy up."""
RESYNC_WINDOW = 12
"""Source tokens an edit may skip (replace) and still be bridged."""
RESYNC_AFTER = 16
"""Output tokens after leaving the copy within which an edit is bridged."""
SUB_MAX = 8
"""The longest substitution learned (source or written tokens)."""
AUTO_MIN_MATCH = NGRAM
"""In auto mode a sequence may draft behind any n-gram match: the learned table (by match
length) and the step costs decide whether it pays. A copy with edits every dozen tokens
(a rename in a code file) must draft between them, right after the match picks up again
(llama-server's ngram-mod waits for 24 tokens and misses those)."""
MARGIN = 1.15
"""A plan must promise this much more throughput than plain decoding: step costs are the
fastest of recent samples and acceptance an average, so a thin margin drafts where it
only breaks even (with 1.05, prose and 8 streams measured 0.95-0.96x plain here)."""
BORROW = 2.0
"""How much more a row costs, until measured, among several sequences than alone."""
EXPLORE_ROWS = 16
"""The most rows a step that explores may have."""
SAMPLES = 16
"""Step times kept per batch size (the fastest is the estimate)."""
PRIOR_WEIGHT = 2.0
"""Tokens' worth of trust in the engine's acceptance table before a sequence's own
drafts say otherwise."""


class NgramIndex:
    """A sequence's tokens (prompt, then output) and the copy its output is making of
    them, to draft what comes next.

    - A copy starts where the last NGRAM tokens occurred before (of their latest
      OCCURRENCES, the one with the longest match behind it: in code of many similar
      blocks, the block this one copies), and is followed token by token after that: a
      cursor on the source, so a copy of block 5 drafts block 5's names, not those of
      the block last seen.
    - An edit (the output leaves the copy) is bridged: when the RESYNC tokens after it
      are found again in the source within RESYNC_WINDOW tokens of where it left, the
      copy goes on from there, and what the output wrote instead of the skipped source
      tokens is learned as a substitution ("default" -> "fallback"), drafted in place of
      those tokens from then on (so a rename drafts as well as a verbatim copy).
    - `draft` gives the copy's next tokens and its run: how many tokens it has matched
      (before the cursor was set) and followed since (across bridged edits), which the
      policy's table keys on.
    """

    def __init__(
        self, tokens: Sequence[int], n: int = NGRAM, history: History | None = None
    ) -> None:
        self.n = n
        self.history = history
        self.tokens: list[int] = []
        self._ends: dict[tuple[int, ...], list[int]] = {}
        self._subs: dict[int, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
        self._build(tokens)

    def _build(self, tokens: Sequence[int]) -> None:
        n = self.n
        toks = self.tokens = list(tokens)
        self._ends = {}
        for end in range(n, len(toks)):
            self._index(end)
        self._src: list[int] = toks
        """The tokens the copy is made of: these (prompt and output), or an earlier
        sequence's from the history."""
        self._cursor: int | None = None
        """Where in `_src` the copy's next token is (after `_pending`)."""
        self._pending: tuple[int, ...] = ()
        """The rest of a substitution being written before the cursor's token."""
        self._run = 0
        self._left: tuple[int, int, int] | None = None
        """(source position, output position, run) where the output last left its copy."""

    def push(self, token: int) -> None:
        toks = self.tokens
        toks.append(token)
        end = len(toks) - 1
        if end >= self.n:
            self._index(end)
        if self._cursor is not None:
            step = self._next(self._cursor, self._pending)
            if step is not None and step[0] == token:
                _, self._cursor, self._pending, _ = step
                self._run += 1
                return
            if step is not None and step[3] is not None:
                self._forget(step[3])  # a substitution the output did not make here
            self._left = (self._cursor, end, self._run)
            self._cursor, self._pending, self._run = None, (), 0
            return
        if self._left is not None:
            self._resync()

    def _index(self, end: int) -> None:
        """Note that the n-gram before `end` occurred there (its last OCCURRENCES kept)."""
        at = self._ends.setdefault(tuple(self.tokens[end - self.n : end]), [])
        at.append(end)
        if len(at) > OCCURRENCES:
            del at[0]

    def ends(self, key: tuple[int, ...]) -> list[int] | None:
        """Where the n-gram `key` last ended (its latest occurrences, oldest first)."""
        return self._ends.get(key)

    def truncate(self, length: int) -> None:
        """Forget tokens from `length` on (a banned phrase rewound them): rebuilt (the
        substitutions learned are kept)."""
        if length < len(self.tokens):
            self._build(self.tokens[:length])

    def draft(self, limit: int) -> tuple[list[int], int]:
        """Up to `limit` tokens the copy goes on with, and its run (0 and no tokens when
        the output copies nothing now)."""
        toks = self.tokens
        if len(toks) < self.n or limit <= 0:
            return [], 0
        if self._cursor is None and not self._start():
            return [], 0
        cursor, pending = self._cursor, self._pending
        assert cursor is not None
        if not pending and not self._subs:
            return self._src[cursor : cursor + limit], self._run  # a plain copy: a slice
        out: list[int] = []
        while len(out) < limit:
            step = self._next(cursor, pending)
            if step is None:
                break
            out.append(step[0])
            _, cursor, pending, _ = step
        return out, self._run

    def _start(self) -> bool:
        """Set the cursor after the earlier occurrence of the last n tokens with the
        longest match behind it (the latest among equals, these tokens before the
        history's)."""
        toks = self.tokens
        key = tuple(toks[-self.n :])
        sources: list[tuple[list[int], list[int]]] = []
        own = self._ends.get(key)
        if own:
            sources.append((toks, own))
        if self.history is not None:
            sources.extend(self.history.occurrences(key))
        best, best_src, best_end = -1, toks, 0
        for src, ends in sources:
            for end in reversed(ends):
                matched, top = self.n, min(MAX_MATCH, end, len(toks))
                while matched < top and toks[-1 - matched] == src[end - 1 - matched]:
                    matched += 1
                if matched > best:
                    best, best_src, best_end = matched, src, end
        if best < 0:
            return False
        self._src, self._cursor, self._pending = best_src, best_end, ()
        self._run, self._left = best, None
        return True

    def _next(
        self, cursor: int, pending: tuple[int, ...]
    ) -> tuple[int, int, tuple[int, ...], tuple[int, ...] | None] | None:
        """The copy's next token from (cursor, pending), the state after it, and the
        source tokens of the substitution it starts (if it starts one); None at the end."""
        if pending:
            return pending[0], cursor, pending[1:], None
        toks = self._src
        if cursor >= len(toks):
            return None
        for source, written in self._subs.get(toks[cursor], ()):
            if tuple(toks[cursor : cursor + len(source)]) == source:
                return written[0], cursor + len(source), written[1:], source
        return toks[cursor], cursor + 1, (), None

    def _resync(self) -> None:
        """After an edit: pick the copy up again where its last RESYNC tokens follow the
        source within RESYNC_WINDOW of where the output left it, and learn what the edit
        wrote in place of the source tokens it skipped."""
        assert self._left is not None
        source, left, run = self._left
        toks, src, m = self.tokens, self._src, RESYNC
        end = len(toks)
        if end - left > RESYNC_AFTER:
            self._left = None  # not an edit of a few tokens: wait for an n-gram match
            return
        if end - left < m:
            return
        tail = toks[-m:]
        # The copy's source is before the edit (in these tokens) or anywhere (history).
        top = min(source + RESYNC_WINDOW + m, left if src is toks else len(src))
        for j in range(source + m, top + 1):
            if src[j - m : j] == tail:
                skipped = tuple(src[source : j - m])
                written = tuple(toks[left : end - m])
                if skipped and written and len(skipped) <= SUB_MAX and len(written) <= SUB_MAX:
                    subs = self._subs.setdefault(skipped[0], [])
                    subs[:] = [(s, w) for s, w in subs if s != skipped]
                    subs.append((skipped, written))
                    subs.sort(key=lambda sw: -len(sw[0]))  # the longest source first
                # The copy goes on, but one with edits it has not learned is less sure
                # to: each halves the run (a story that drifts from an earlier one
                # soon drafts short, a rename learned makes no more edits).
                self._cursor, self._pending, self._run, self._left = j, (), run // 2 + m, None
                return

    def _forget(self, source: tuple[int, ...]) -> None:
        subs = self._subs.get(source[0], [])
        subs[:] = [(s, w) for s, w in subs if s != source]


class History:
    """The tokens (prompt and output) of a model's last HISTORY finished sequences,
    which every later sequence may copy from: a request that writes what an earlier
    one wrote (the same file rewritten again, a regenerated answer, an agent's resent
    turn) drafts it from there. Kept as their own indexes (nothing is built twice)."""

    def __init__(self, keep: int = HISTORY) -> None:
        self._kept: deque[NgramIndex] = deque(maxlen=keep)

    def add(self, index: NgramIndex) -> None:
        if len(index.tokens) > index.n:
            index.history = None  # no chains of histories kept alive
            self._kept.append(index)

    def occurrences(self, key: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
        """(tokens, ends) of each kept sequence where `key` occurred, newest first."""
        out = []
        for index in reversed(self._kept):
            ends = index.ends(key)
            if ends:
                out.append((index.tokens, ends))
        return out


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
    as forced drafting would (at most to EXPLORE_ROWS rows), to learn."""
    REVISIT = 64
    """Steps that declined drafts behind a bucket after which one is tried anyway, so a
    table made pessimistic by one kind of text (prose) learns again when another (code)
    comes."""

    def __init__(self) -> None:
        n, buckets = len(self.POSITIONS), len(self.STARTS)
        self._trials = [[0.0] * n for _ in range(buckets)]
        self._rejects = [[0.0] * n for _ in range(buckets)]
        self._drafts = [0] * buckets
        self._declined = [0] * buckets

    @classmethod
    def bucket(cls, matched: int) -> int:
        """0: under 8, 1: 8-15, 2: 16-31, 3: 32-63, 4: 64-127, 5: longer."""
        return min(matched.bit_length() - 3, len(cls.STARTS) - 1) if matched >= 8 else 0

    @staticmethod
    def _pos(i: int) -> int:
        return _POSITION_BIN[min(i, MAX_DRAFT - 1)]

    def hazard(self, matched: int, i: int) -> float:
        """How often the draft's i-th token is the first rejected, given the ones before
        it were kept: a position no draft has reached yet has the hazard of the last one
        reached (a copy's hazard hardly changes along it; explored drafts are short),
        and a bucket nothing reached a prior of one in two."""
        b, p = self.bucket(matched), self._pos(i)
        trials, rejects = self._trials[b], self._rejects[b]
        while p > 0 and trials[p] < 1:
            p -= 1
        return (rejects[p] + 1) / (trials[p] + 2)

    def rate(self, matched: int) -> float:
        """How often a draft's first token is kept."""
        return 1.0 - self.hazard(matched, 0)

    def exploring(self, matched: int) -> bool:
        """Too few drafts behind this match length to trust the table (or too many
        declined since the last): draft anyway, to learn."""
        b = self.bucket(matched)
        return self._drafts[b] < self.EXPLORE or self._declined[b] >= self.REVISIT

    def declined(self, matched: int) -> None:
        self._declined[self.bucket(matched)] += 1

    def record(self, matched: int, drafted: int, accepted: int) -> None:
        """A draft of `drafted` tokens behind a match of `matched`: its first `accepted`
        tokens were kept; the one after them (if any) was the first rejected."""
        b = self.bucket(matched)
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
    """Seconds a decode of n tokens takes (each with its logits), for one number of
    decoding sequences (`costs_bucket`): each size's time is the fastest of its last
    SAMPLES steps (a step is only ever slowed: by a size's first graph, another thread
    holding the GIL, a shared machine), and past the largest size measured a slope per
    extra token, the median over the sizes of (t(n) - t(base)) / (n - base) from the
    smallest size (the plain step)."""

    fallback: StepCosts | None = None
    """Another table (one sequence's) whose slope, times BORROW, prices rows while this
    one has measured a single size."""
    _samples: dict[int, deque[float]] = field(default_factory=dict)
    _median: dict[int, float] = field(default_factory=dict)
    _sizes: list[int] = field(default_factory=list)
    _slope: float | None = None

    def observe(self, n: int, seconds: float) -> None:
        kept = self._samples.get(n)
        if kept is None:
            kept = self._samples[n] = deque(maxlen=SAMPLES)
            bisect.insort(self._sizes, n)
        kept.append(seconds)
        self._median[n] = min(kept)
        self._fit()

    def _fit(self) -> None:
        base = self._sizes[0]
        t0 = self._median[base]
        slopes = [(t - t0) / (n - base) for n, t in self._median.items() if n > base]
        self._slope = max(statistics.median(slopes), 0.0) if slopes else None

    def estimate(self, n: int) -> float | None:
        """t(n): between two measured sizes, the line through them (a batch's cost grows
        more slowly than its rows on many machines); past the largest, that size's time
        plus the slope per extra token (borrowed while there is none); None below the
        smallest size or with nothing to price extra rows by."""
        sizes = self._sizes
        if not sizes or n < sizes[0]:
            return None
        known = self._median.get(n)
        if known is not None:
            return known
        i = bisect.bisect_left(sizes, n)  # sizes[i - 1] < n < sizes[i]
        if i < len(sizes):
            below, above = sizes[i - 1], sizes[i]
            t0, t1 = self._median[below], self._median[above]
            return t0 + (t1 - t0) * (n - below) / (above - below)
        slope = self._slope
        if slope is None and self.fallback is not None:
            slope = None if self.fallback._slope is None else self.fallback._slope * BORROW
        if slope is None:
            return None
        return self._median[sizes[-1]] + slope * (n - sizes[-1])

    def sizes(self) -> list[int]:
        """The step sizes measured, smallest first."""
        return self._sizes

    def known(self) -> dict[str, float]:
        out = {str(n): round(t * 1000, 3) for n, t in sorted(self._median.items())}
        if self._slope is not None:
            out["per_extra_token"] = round(self._slope * 1000, 3)
        return out


BUCKET_NAMES = ("1", "2", "3-4", "5-8", "9+")
"""The numbers of decoding sequences of each `costs_bucket`."""


def costs_bucket(sequences: int) -> int:
    """Steps are timed apart by how many sequences decode in them: 1, 2, 3-4, 5-8, 9+.
    A step's rows cost more the more cells the sequences attend over (measured here: 32
    rows cost 0.2 s for one sequence and 1.3 s among eight), so one sequence's
    calibration would price drafts among many far too low."""
    return min(max(sequences, 1) - 1, 8).bit_length()


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
    declined: set[int] = set()
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
                # Learning: the forced length, up to a step of EXPLORE_ROWS rows (a
                # failed exploration costs little), if it would pay were it all kept.
                k = min(limit, matched, EXPLORE_ROWS - tokens)
                cost = costs.estimate(tokens + k) if k > 0 else None
                if cost is None or (outputs + k) / cost <= plain:
                    continue
            else:
                k = _best_length(gains, tokens, outputs, plain, costs)
                if k == 0:
                    bucket = acceptance.bucket(matched)
                    if bucket not in declined:  # once a step (at 8 streams, not 8 times)
                        declined.add(bucket)
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
    # Only steps of a size measured (between two, a step can cost more than either side:
    # ggml's CPU matmuls are fastest in whole tiles), or the longest draft past them all.
    sizes = costs.sizes()
    if sizes and sizes[-1] < tokens + len(gains):
        sizes = [*sizes, tokens + len(gains)]
    for size in sizes:
        j = size - tokens
        if j < 1:
            continue
        if j > len(gains):
            break
        cost = costs.estimate(size)
        if cost is None or cost <= 0:
            break
        rate = (outputs + gains[j - 1]) / cost
        if rate > best_rate:
            best_rate, k = rate, j
    return k
