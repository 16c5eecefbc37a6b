"""Per-request sampler chains: llama.cpp's samplers, plus the few it lacks in numpy.

The chain is built once per request; the per-token path is one `llama_sampler_sample`
call. Stages llama.cpp lacks (top_a, tail-free, smoothing) are numpy stages inside the
chain (engine/stages.py); the logits row is touched in numpy only for min_tokens, a
banned phrase's rewind, or logprobs.
"""

from __future__ import annotations

import ctypes
import math
import random
from collections.abc import Callable, Collection
from typing import Any

import llama_cpp.llama_cpp as lc
import numpy as np
import numpy.typing as npt

from server.engine import stages
from server.engine.llama import LlamaModel
from server.engine.stages import TOKEN_DATA, NumpyStage
from server.engine.types import SamplingParams, TokenLogprob

# The default order of the truncation/shaping stages, after logit bias and penalties.
DEFAULT_ORDER: tuple[str, ...] = (
    "smoothing",
    "top_n_sigma",
    "top_k",
    "top_a",
    "tfs",
    "typical_p",
    "top_p",
    "min_p",
    "xtc",
    "temperature",
)
# Mirostat v1's sample size for estimating s_hat (the paper's and llama.cpp's value).
MIROSTAT_M = 100
# The stages `sampler_order` may reorder; the others (bias, penalties, DRY, grammar)
# have fixed places before them, and the final pick (dist or adaptive-p) comes last.
STAGES = frozenset(DEFAULT_ORDER)


class GrammarDeadEnd(Exception):
    """No token is allowed: the grammar and the request's bans exclude every one.

    `complete` is true when the grammar would accept end-of-generation (the document
    is finished and only a ban on EOS, `ignore_eos` or `min_tokens` kept it going).
    """

    def __init__(self, complete: bool) -> None:
        super().__init__("no token satisfies both the grammar and the request's bans")
        self.complete = complete


class NoTokenLeft(Exception):
    """Every token is excluded at this position (bans on top of the request's own)."""


class Snapshot:
    """Clones of a SeqSampler's chain parts, to return to after a rewind."""

    def __init__(self, owner: SeqSampler, chain: Any, head: Any, grammar: Any) -> None:
        self.owner = owner  # keeps the numpy stages the clones point into alive
        self._parts: tuple[Any, Any, Any] | None = (chain, head, grammar)

    def take(self) -> tuple[Any, Any, Any]:
        assert self._parts is not None
        parts, self._parts = self._parts, None
        return parts

    def free(self) -> None:
        if self._parts is not None:
            for part in self._parts:
                if part is not None:
                    lc.llama_sampler_free(part)
            self._parts = None


class SeqSampler:
    """One sequence's sampler: a llama sampler chain plus numpy pre-processing.

    With a grammar the chain is split in three (bias/penalties/DRY, the grammar, the
    rest) and applied step by step on our own candidate array: llama.cpp aborts the
    process when a token the grammar rejects is accepted, which happens whenever every
    token it allows was banned. Here such a dead end is detected before anything is
    accepted. min_tokens then runs after the grammar, on what it allows.
    """

    def __init__(self, model: LlamaModel, params: SamplingParams, seed: int | None) -> None:
        self.model = model
        self.params = params
        self.seed = (seed if seed is not None else random.getrandbits(32)) & 0xFFFFFFFF
        self._keep: list[object] = []  # ctypes buffers and numpy stages the chain uses
        self.head: Any = None  # with a grammar: bias, penalties and DRY
        self.grammar: Any = None
        self._candidates: Any = None
        try:
            self.chain = self._build()
        except BaseException:
            self._free_parts()
            raise
        self._eog_ids = model.eog_ids
        self._pre: list[Callable[[npt.NDArray[np.float32], int], None]] = []
        if params.min_tokens > 0:
            self._pre.append(self._suppress_eog_until_min)
        self.wants_logprobs = params.top_logprobs is not None

    def _build(self) -> Any:
        p = self.params
        m = self.model
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        add: Callable[[object], None] = lambda s: lc.llama_sampler_chain_add(chain, s)  # noqa: E731
        if p.grammar:
            grammar = lc.llama_sampler_init_grammar(m.vocab, p.grammar.encode(), b"root")
            if not grammar:
                lc.llama_sampler_free(chain)
                raise ValueError("invalid grammar")
            self.grammar = grammar
            self.head = chain
            n = m.n_vocab
            self._candidates = (lc.llama_token_data * n)()
            self._view = np.frombuffer(memoryview(self._candidates), dtype=TOKEN_DATA)
            self._ids = np.arange(n, dtype=np.int32)
            chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
            add = lambda s: lc.llama_sampler_chain_add(self.head, s)  # noqa: E731
        bias = dict(p.logit_bias)
        if p.ignore_eos:
            for eog in m.eog_ids:
                bias[int(eog)] = -math.inf
        if bias:
            arr = (lc.llama_logit_bias * len(bias))()
            for i, (tok, val) in enumerate(bias.items()):
                arr[i] = lc.llama_logit_bias(token=tok, bias=val)
            self._keep.append(arr)
            add(lc.llama_sampler_init_logit_bias(m.n_vocab, len(bias), arr))
        if p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            add(
                lc.llama_sampler_init_penalties(
                    m.n_vocab,
                    p.penalty_last_n,
                    p.repetition_penalty,
                    p.frequency_penalty,
                    p.presence_penalty,
                )
            )
        if p.dry_multiplier > 0:
            breakers = [b.encode() for b in p.dry_sequence_breakers]
            c_breakers = (ctypes.c_char_p * len(breakers))(*breakers)
            self._keep.append(c_breakers)
            add(
                lc.llama_sampler_init_dry(
                    m.vocab,
                    p.dry_multiplier,
                    p.dry_base,
                    p.dry_allowed_length,
                    p.dry_penalty_last_n,
                    c_breakers,
                    len(breakers),
                )
            )
        add = lambda s: lc.llama_sampler_chain_add(chain, s)  # noqa: E731
        if p.greedy:
            add(lc.llama_sampler_init_greedy())
            return chain
        if p.mirostat:
            # Mirostat replaces the truncation stages: it picks its own top-k each step.
            add(lc.llama_sampler_init_temp(p.temperature))
            if p.mirostat == 1:
                add(
                    lc.llama_sampler_init_mirostat(
                        m.n_vocab, self.seed, p.mirostat_tau, p.mirostat_eta, MIROSTAT_M
                    )
                )
            else:
                add(lc.llama_sampler_init_mirostat_v2(self.seed, p.mirostat_tau, p.mirostat_eta))
            return chain
        order = list(p.sampler_order or ())
        order += [stage for stage in DEFAULT_ORDER if stage not in order]  # unlisted: after
        for stage in order:
            self._add_stage(add, stage)
        if p.adaptive_target >= 0:
            # adaptive-p draws the token itself, near a target probability (llama.cpp #17927).
            add(lc.llama_sampler_init_adaptive_p(p.adaptive_target, p.adaptive_decay, self.seed))
        else:
            add(lc.llama_sampler_init_dist(self.seed))
        return chain

    def _numpy_stage(
        self, add: Callable[[object], None], name: str, fn: Callable[..., Any]
    ) -> None:
        stage = NumpyStage(name, fn)
        self._keep.append(stage)
        add(stage.make())

    def _add_stage(self, add: Callable[[object], None], stage: str) -> None:
        p = self.params
        if stage == "smoothing" and p.smoothing_factor > 0:
            factor, curve = p.smoothing_factor, p.smoothing_curve
            self._numpy_stage(add, "smoothing", lambda x: stages.smoothing(x, factor, curve))
        elif stage == "top_a" and p.top_a > 0:
            a = p.top_a
            self._numpy_stage(add, "top-a", lambda x: stages.top_a(x, a))
        elif stage == "tfs" and p.tfs < 1.0:
            z = p.tfs
            self._numpy_stage(add, "tail-free", lambda x: stages.tail_free_keep(x, z))
        elif stage == "top_n_sigma" and p.top_n_sigma > 0:
            add(lc.llama_sampler_init_top_n_sigma(p.top_n_sigma))
        elif stage == "top_k" and p.top_k > 0:
            add(lc.llama_sampler_init_top_k(p.top_k))
        elif stage == "typical_p" and p.typical_p < 1.0:
            add(lc.llama_sampler_init_typical(p.typical_p, 1))
        elif stage == "top_p" and p.top_p < 1.0:
            add(lc.llama_sampler_init_top_p(p.top_p, 1))
        elif stage == "min_p" and p.min_p > 0:
            add(lc.llama_sampler_init_min_p(p.min_p, 1))
        elif stage == "xtc" and p.xtc_probability > 0:
            add(lc.llama_sampler_init_xtc(p.xtc_probability, p.xtc_threshold, 1, self.seed))
        elif stage == "temperature":
            if p.dynatemp_range > 0:
                add(
                    lc.llama_sampler_init_temp_ext(
                        p.temperature, p.dynatemp_range, p.dynatemp_exponent
                    )
                )
            else:
                add(lc.llama_sampler_init_temp(p.temperature))

    def _suppress_eog_until_min(self, row: npt.NDArray[np.float32], n_generated: int) -> None:
        if n_generated < self.params.min_tokens:
            row[self._eog_ids] = -np.inf

    def sample(
        self, index: int, n_generated: int, banned: Collection[int] = ()
    ) -> tuple[int, TokenLogprob | None]:
        """Pick the next token from batch position `index`; the chain accepts it.

        `banned`: tokens excluded at this position (a banned phrase began with them).
        Raises GrammarDeadEnd (nothing accepted) when a grammar leaves no token, and
        NoTokenLeft when the bans exclude every token.
        """
        logprob: TokenLogprob | None = None
        raw: npt.NDArray[np.float32] | None = None
        if self.grammar is not None:
            row = self.model.logits_row(index)
            if self.wants_logprobs:
                raw = row.copy()
            if banned:
                row[list(banned)] = -np.inf
            token = self._pick_constrained(row, n_generated)
            self.accept(token)
        else:
            if self._pre or self.wants_logprobs or banned:
                row = self.model.logits_row(index)
                if self.wants_logprobs:
                    raw = row.copy()
                for fn in self._pre:
                    fn(row, n_generated)
                if banned:
                    row[list(banned)] = -np.inf
                    if not np.isfinite(row).any():
                        raise NoTokenLeft()
            token = int(lc.llama_sampler_sample(self.chain, self.model.ctx, index))
        if raw is not None:
            logprob = self._logprob(raw, token)
        return token, logprob

    def snapshot(self) -> Snapshot:
        """A copy of the chain's state now (penalty history, grammar, RNG, adaptive-p)."""
        return Snapshot(
            self,
            lc.llama_sampler_clone(self.chain),
            lc.llama_sampler_clone(self.head) if self.head is not None else None,
            lc.llama_sampler_clone(self.grammar) if self.grammar is not None else None,
        )

    def restore(self, snap: Snapshot) -> None:
        """Go back to `snap`'s state; the snapshot is used up."""
        assert snap.owner is self
        self.close_chain()
        self.chain, self.head, self.grammar = snap.take()

    def _pick_constrained(self, row: npt.NDArray[np.float32], n_generated: int) -> int:
        """Head, grammar, pre-steps, dead-end check, then the rest of the chain."""
        view = self._view
        view["id"] = self._ids  # the tail's stages sort in place: reset every step
        view["logit"] = row
        view["p"] = 0.0
        n = len(view)
        cur = lc.llama_token_data_array(data=self._candidates, size=n, selected=-1, sorted=False)
        ref = ctypes.byref(cur)
        lc.llama_sampler_apply(self.head, ref)
        lc.llama_sampler_apply(self.grammar, ref)
        # Head and grammar only mask (no sort, no resize): index == token id still.
        logits = view["logit"]
        for fn in self._pre:
            fn(logits, n_generated)
        if not np.isfinite(logits).any():
            raise GrammarDeadEnd(self._grammar_accepts_end())
        lc.llama_sampler_apply(self.chain, ref)
        # Read through cur.data: a stage may move the pointer (XTC drops the head).
        return int(cur.data[cur.selected].id)

    def _grammar_accepts_end(self) -> bool:
        eog = self.model.eog_ids
        if eog.size == 0:
            return False
        one = (lc.llama_token_data * 1)()
        one[0].id = int(eog[0])  # type: ignore[assignment]
        one[0].logit = 0.0
        cur = lc.llama_token_data_array(data=one, size=1, selected=-1, sorted=False)
        lc.llama_sampler_apply(self.grammar, ctypes.byref(cur))
        return math.isfinite(one[0].logit)

    def sample_logits(self, logits: npt.NDArray[np.float32], n_generated: int = 0) -> int:
        """Pick a token from a given logits row with this same chain, without a context.

        The numpy pre-steps and the llama.cpp chain run exactly as in `sample`, but the
        token is not accepted (call `accept`); tests use this to check each sampler
        against its definition on fixed logits.
        """
        row = np.array(logits, dtype=np.float32)
        if self.grammar is not None:
            return self._pick_constrained(row, n_generated)
        for fn in self._pre:
            fn(row, n_generated)
        n = len(row)
        data = (lc.llama_token_data * n)()
        view = np.frombuffer(memoryview(data), dtype=TOKEN_DATA)
        view["id"] = np.arange(n, dtype=np.int32)
        view["logit"] = row
        view["p"] = 0.0
        cur = lc.llama_token_data_array(data=data, size=n, selected=-1, sorted=False)
        lc.llama_sampler_apply(self.chain, ctypes.byref(cur))
        # Read through cur.data: a stage may move the pointer (XTC drops the head).
        return int(cur.data[cur.selected].id)

    def allows(self, token: int) -> bool:
        """Whether the grammar (if any) accepts `token` next: a forced token must, or
        llama.cpp's grammar aborts the process."""
        if self.grammar is None:
            return True
        one = (lc.llama_token_data * 1)()
        one[0].id = token  # type: ignore[assignment]
        one[0].logit = 0.0
        cur = lc.llama_token_data_array(data=one, size=1, selected=-1, sorted=False)
        lc.llama_sampler_apply(self.grammar, ctypes.byref(cur))
        return math.isfinite(one[0].logit)

    def accept(self, token: int) -> None:
        """Record `token` as generated (penalties, DRY, grammar and mirostat keep state)."""
        if self.grammar is not None:
            lc.llama_sampler_accept(self.head, token)
            lc.llama_sampler_accept(self.grammar, token)
        lc.llama_sampler_accept(self.chain, token)

    def _logprob(self, raw: npt.NDArray[np.float32], token: int) -> TokenLogprob:
        m = float(raw.max())
        logz = m + math.log(float(np.exp(raw - m).sum()))
        k = self.params.top_logprobs or 0
        top: list[tuple[str, float, list[int]]] = []
        if k > 0:
            ids = np.argpartition(-raw, k)[:k]
            ids = ids[np.argsort(-raw[ids])]
            for t in ids:
                piece = self.model.piece(int(t))
                top.append(
                    (piece.decode("utf-8", errors="replace"), float(raw[t]) - logz, list(piece))
                )
        piece = self.model.piece(token)
        return TokenLogprob(
            token=piece.decode("utf-8", errors="replace"),
            logprob=float(raw[token]) - logz,
            bytes=list(piece),
            top=top,
        )

    def close(self) -> None:
        self.close_chain()

    def close_chain(self) -> None:
        if getattr(self, "chain", None) is not None:
            lc.llama_sampler_free(self.chain)
            self.chain = None
        self._free_parts()

    def _free_parts(self) -> None:
        for name in ("head", "grammar"):
            part = getattr(self, name)
            if part is not None:
                lc.llama_sampler_free(part)
                setattr(self, name, None)
