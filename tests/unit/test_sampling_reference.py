"""Samplers applied in numpy, checked against a plain reference on fixed logits."""

import numpy as np

from server.engine.stages import top_a as apply_top_a


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_top_a_keeps_tokens_above_a_times_pmax_squared() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=1000).astype(np.float32) * 3
    for a in (0.0, 0.2, 0.5, 1.0):
        row = logits.copy()
        apply_top_a(row, a)
        p = _softmax(logits.astype(np.float64))
        expected = p >= a * p.max() ** 2
        assert np.array_equal(np.isfinite(row), expected), a
        assert np.array_equal(row[expected], logits[expected])


def test_top_a_never_removes_the_best_token() -> None:
    row = np.array([5.0, 5.0, -10.0], dtype=np.float32)
    apply_top_a(row, 1.0)
    assert np.isfinite(row[:2]).all() and not np.isfinite(row[2])
