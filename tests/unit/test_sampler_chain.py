"""Each sampler of the real chain against a numpy reference of its definition.

The chain is the one a request gets (llama.cpp's samplers plus Hostler's numpy steps),
run on fixed logits; many seeded draws must match the reference distribution, and a
token the reference removes must never be drawn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from server.engine.sampling import SeqSampler
from server.engine.types import SamplingParams

Arr = npt.NDArray[np.float64]
N_DRAWS = 20_000
LOGITS = np.random.default_rng(42).normal(size=24) * 2.0
BEST = int(np.argmax(LOGITS))


class _Vocab:
    """What SeqSampler needs of a model when it never touches a context."""

    def __init__(self, n: int) -> None:
        self.n_vocab = n
        self.vocab = None
        self._eog = np.zeros(n, dtype=bool)
        self._eog[-1] = True
        self.eog_ids = np.flatnonzero(self._eog)


def softmax(logits: Arr) -> Arr:
    finite = np.isfinite(logits)
    out = np.zeros_like(logits)
    e = np.exp(logits[finite] - logits[finite].max())
    out[finite] = e / e.sum()
    return out


def keep(logits: Arr, mask: npt.NDArray[np.bool_]) -> Arr:
    out = logits.copy()
    out[~mask] = -np.inf
    return out


# -- the reference, one function per definition ------------------------------------


def ref_temperature(x: Arr, t: float) -> Arr:
    return x / t


def ref_top_k(x: Arr, k: int) -> Arr:
    return keep(x, x >= np.sort(x)[-k])


def ref_top_p(x: Arr, top_p: float) -> Arr:
    p = softmax(x)
    order = np.argsort(-p, kind="stable")
    n = int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)  # smallest prefix with mass >= p
    mask = np.zeros(len(x), dtype=bool)
    mask[order[:n]] = True
    return keep(x, mask)


def ref_min_p(x: Arr, min_p: float) -> Arr:
    p = softmax(x)
    return keep(x, p >= min_p * p.max())


def ref_top_a(x: Arr, a: float) -> Arr:
    p = softmax(x)
    return keep(x, p >= a * p.max() ** 2)


def ref_typical(x: Arr, typical_p: float) -> Arr:
    p = softmax(x)
    nz = p > 0
    entropy = -np.sum(p[nz] * np.log(p[nz]))
    shifted = np.full(len(x), np.inf)
    shifted[nz] = np.abs(-np.log(p[nz]) - entropy)
    order = np.argsort(shifted, kind="stable")
    cum = np.cumsum(p[order])
    n = int(np.argmax(cum > typical_p)) + 1 if (cum > typical_p).any() else len(x)
    mask = np.zeros(len(x), dtype=bool)
    mask[order[:n]] = True
    return keep(x, mask)


def ref_top_n_sigma(x: Arr, n: float) -> Arr:
    finite = x[np.isfinite(x)]
    return keep(x, x >= finite.max() - n * finite.std())


def ref_xtc(x: Arr, threshold: float) -> Arr:
    """With probability 1: drop every token at or above the threshold but the least likely."""
    p = softmax(x)
    above = np.flatnonzero(p >= threshold)
    if len(above) < 2:
        return x
    least = above[np.argmin(p[above])]
    mask = np.ones(len(x), dtype=bool)
    mask[above] = False
    mask[least] = True
    return keep(x, mask)


def ref_penalties(x: Arr, history: list[int], rep: float, freq: float, pres: float) -> Arr:
    out = x.copy()
    counts = np.bincount(history, minlength=len(x))
    for t in np.flatnonzero(counts):
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
        out[t] -= counts[t] * freq + pres
    return out


def ref_bias(x: Arr, bias: dict[int, float]) -> Arr:
    out = x.copy()
    for token, value in bias.items():
        out[token] += value
    return out


def ref_dynatemp(x: Arr, t: float, delta: float, exponent: float) -> Arr:
    p = softmax(x)
    nz = p > 0
    entropy = -np.sum(p[nz] * np.log(p[nz]))
    normalized = entropy / np.log(nz.sum())
    lo, hi = max(0.0, t - delta), t + delta
    return x / (lo + (hi - lo) * normalized**exponent)


def ref_tfs(x: Arr, z: float) -> Arr:
    """Tail-free sampling as its author defined it, written as a plain loop."""
    p = softmax(x)
    order = sorted(range(len(x)), key=lambda i: -p[i])
    ps = [p[i] for i in order]
    first = [ps[i] - ps[i + 1] for i in range(len(ps) - 1)]
    second = [abs(first[i] - first[i + 1]) for i in range(len(first) - 1)]
    total = sum(second)
    cum, n = 0.0, len(ps)
    for i, d in enumerate(second):
        cum += d / total
        if cum > z:
            n = i + 1
            break
    mask = np.zeros(len(x), dtype=bool)
    mask[order[:n]] = True
    return keep(x, mask)


def ref_smoothing(x: Arr, factor: float, curve: float) -> Arr:
    top = x.max()
    d = x - top
    k = (3 - curve) / 2
    s = (curve - 1) / 2
    return -(k * factor * d**2) + (s * factor * d**3) + top


def ref_adaptive_p(x: Arr, target: float) -> Arr:
    """adaptive-p's first draw (its history starts at the target): logits by distance
    from the target, quadratic near it and linear far away (llama.cpp #17927)."""
    p = softmax(x)
    d = np.abs(p - target) / 0.3
    out = 5.0 - 10.0 * d * d / (1.0 + d)
    out[~np.isfinite(x)] = -np.inf
    return out


# -- the harness ----------------------------------------------------------------------


def empirical(params: SamplingParams, logits: Arr, history: list[int] = ()) -> Arr:  # type: ignore[assignment]
    sampler = SeqSampler(_Vocab(len(logits)), params, seed=1234)  # type: ignore[arg-type]
    try:
        for t in history:
            sampler.accept(t)
        row = logits.astype(np.float32)
        counts = np.bincount(
            [sampler.sample_logits(row) for _ in range(N_DRAWS)], minlength=len(logits)
        )
    finally:
        sampler.close()
    return counts / N_DRAWS


def assert_matches(observed: Arr, expected_logits: Arr) -> None:
    expected = softmax(expected_logits)
    never = expected == 0
    assert not observed[never].any(), f"drew removed tokens {np.flatnonzero(observed * never)}"
    # Binomial noise: 5 standard deviations per token (plus float32 slack).
    tolerance = 5 * np.sqrt(expected * (1 - expected) / N_DRAWS) + 2e-3
    worst = np.max(np.abs(observed - expected) - tolerance)
    assert worst <= 0, f"observed {np.round(observed, 3)}\nexpected {np.round(expected, 3)}"


CASES: list[tuple[str, dict[str, Any], Callable[[Arr], Arr]]] = [
    ("temperature 0.5", {"temperature": 0.5}, lambda x: ref_temperature(x, 0.5)),
    ("temperature 1.7", {"temperature": 1.7}, lambda x: ref_temperature(x, 1.7)),
    ("top_k 5", {"top_k": 5}, lambda x: ref_top_k(x, 5)),
    ("top_p 0.8", {"top_p": 0.8}, lambda x: ref_top_p(x, 0.8)),
    ("min_p 0.1", {"min_p": 0.1}, lambda x: ref_min_p(x, 0.1)),
    ("top_a 0.3", {"top_a": 0.3}, lambda x: ref_top_a(x, 0.3)),
    ("typical_p 0.7", {"typical_p": 0.7}, lambda x: ref_typical(x, 0.7)),
    ("top_n_sigma 1", {"top_n_sigma": 1.0}, lambda x: ref_top_n_sigma(x, 1.0)),
    (
        "xtc",
        {"xtc_threshold": 0.1, "xtc_probability": 1.0},
        lambda x: ref_xtc(x, 0.1),
    ),
    (
        "logit_bias",
        {"logit_bias": {3: 2.5, 7: -1.0, BEST: float("-inf")}},
        lambda x: ref_bias(x, {3: 2.5, 7: -1.0, BEST: -np.inf}),
    ),
    (
        "dynamic temperature",
        {"temperature": 1.0, "dynatemp_range": 0.5, "dynatemp_exponent": 1.5},
        lambda x: ref_dynatemp(x, 1.0, 0.5, 1.5),
    ),
    (
        "default order: top_k, top_p, min_p, then temperature",
        {"top_k": 12, "top_p": 0.9, "min_p": 0.05, "temperature": 0.8},
        lambda x: ref_temperature(ref_min_p(ref_top_p(ref_top_k(x, 12), 0.9), 0.05), 0.8),
    ),
    (
        "sampler_order puts temperature first",
        {"min_p": 0.2, "temperature": 2.0, "sampler_order": ("temperature", "min_p")},
        lambda x: ref_min_p(ref_temperature(x, 2.0), 0.2),
    ),
    (
        "top_a before temperature by default",
        {"top_a": 0.5, "temperature": 1.5},
        lambda x: ref_temperature(ref_top_a(x, 0.5), 1.5),
    ),
    (
        "top_a after temperature when ordered so",
        {"top_a": 0.5, "temperature": 3.0, "sampler_order": ("temperature", "top_a")},
        lambda x: ref_top_a(ref_temperature(x, 3.0), 0.5),
    ),
    ("tfs 0.95", {"tfs": 0.95}, lambda x: ref_tfs(x, 0.95)),
    ("tfs 0.5", {"tfs": 0.5}, lambda x: ref_tfs(x, 0.5)),
    (
        "smoothing factor 0.3",
        {"smoothing_factor": 0.3},
        lambda x: ref_smoothing(x, 0.3, 1.0),
    ),
    (
        "smoothing factor 0.5, curve 2",
        {"smoothing_factor": 0.5, "smoothing_curve": 2.0},
        lambda x: ref_smoothing(x, 0.5, 2.0),
    ),
    (
        "smoothing, then min_p, then temperature",
        {"smoothing_factor": 0.25, "min_p": 0.05, "temperature": 0.7},
        lambda x: ref_temperature(ref_min_p(ref_smoothing(x, 0.25, 1.0), 0.05), 0.7),
    ),
    ("adaptive-p 0.3", {"adaptive_target": 0.3}, lambda x: ref_adaptive_p(x, 0.3)),
    (
        "min_p, then adaptive-p 0.5",
        {"adaptive_target": 0.5, "min_p": 0.05},
        lambda x: ref_adaptive_p(ref_min_p(x, 0.05), 0.5),
    ),
]


@pytest.mark.parametrize(("fields", "reference"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_sampler_matches_reference(fields: dict[str, Any], reference: Callable[[Arr], Arr]) -> None:
    assert_matches(empirical(SamplingParams(**fields), LOGITS), reference(LOGITS))


def test_penalties_follow_their_definition() -> None:
    history = [0, 1, 1, 2, 2, 2, int(np.argmax(LOGITS))]
    params = SamplingParams(
        repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.3, penalty_last_n=64
    )
    observed = empirical(params, LOGITS, history)
    assert_matches(observed, ref_penalties(LOGITS, history, 1.3, 0.4, 0.3))


def test_penalty_window_forgets_old_tokens() -> None:
    history = [5] * 3 + list(range(10, 14))  # token 5 is outside a window of 4
    params = SamplingParams(repetition_penalty=1.5, penalty_last_n=4)
    observed = empirical(params, LOGITS, history)
    assert_matches(observed, ref_penalties(LOGITS, history[-4:], 1.5, 0.0, 0.0))


def test_min_tokens_bans_end_of_generation_until_reached() -> None:
    logits = LOGITS.copy()
    logits[-1] = 10.0  # the EOG token dominates
    sampler = SeqSampler(_Vocab(len(logits)), SamplingParams(min_tokens=3), seed=1)  # type: ignore[arg-type]
    row = logits.astype(np.float32)
    try:
        early = {sampler.sample_logits(row, n_generated=2) for _ in range(200)}
        late = {sampler.sample_logits(row, n_generated=3) for _ in range(200)}
    finally:
        sampler.close()
    assert len(logits) - 1 not in early
    assert len(logits) - 1 in late


def test_greedy_takes_the_argmax() -> None:
    sampler = SeqSampler(_Vocab(len(LOGITS)), SamplingParams(temperature=0), seed=1)  # type: ignore[arg-type]
    try:
        assert sampler.sample_logits(LOGITS.astype(np.float32)) == int(np.argmax(LOGITS))
    finally:
        sampler.close()
