"""Sampler stages llama.cpp lacks, written in numpy and placed inside its sampler chain.

Each stage is a stateless llama sampler whose `apply` is a Python callback on the
candidate array, so it sits anywhere in the chain's order (SillyTavern, KoboldCpp and
text-generation-webui let users reorder them) and is cloned with the chain like any
other stateless sampler. A request that uses none of them pays nothing for them.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import llama_cpp.llama_cpp as lc
import numpy as np
import numpy.typing as npt

# llama_token_data as numpy sees it: {int32 id; float logit; float p}.
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])

Logits = npt.NDArray[np.float32]


def top_a(logits: Logits, a: float) -> None:
    """Mask (in place) tokens whose probability is below a * p_max**2."""
    finite = np.isfinite(logits)
    if not finite.any():
        return
    probs = np.exp(logits - logits[finite].max())
    probs /= probs.sum()
    p_max = float(probs.max())
    logits[probs < a * p_max * p_max] = -np.inf


def smoothing(logits: Logits, factor: float, curve: float) -> None:
    """Quadratic ("smooth") sampling, text-generation-webui's definition, in place.

    With d = logit - max: logit' = max - k*f*d**2 + s*f*d**3, k = (3 - curve) / 2,
    s = (curve - 1) / 2. curve 1 is the plain quadratic; masked tokens stay masked.
    """
    finite = np.isfinite(logits)
    if not finite.any():
        return
    top = float(logits[finite].max())
    d = logits[finite] - top
    k = (3.0 - curve) / 2.0
    s = (curve - 1.0) / 2.0
    logits[finite] = top - k * factor * d * d + s * factor * d * d * d


def tail_free_keep(logits: Logits, z: float) -> npt.NDArray[np.intp]:
    """Tail-free sampling: the indices to keep, most likely first.

    The sorted probabilities' second differences, normalised, are summed from the head;
    the tail starts where that sum first exceeds z (at least one token is kept).
    """
    order = np.argsort(-logits, kind="stable")
    finite = np.isfinite(logits[order])
    order = order[finite]
    if len(order) <= 2:
        return order
    p = np.exp(logits[order] - logits[order[0]])
    p /= p.sum()
    second = np.abs(np.diff(p, n=2))
    total = float(second.sum())
    if total <= 0:
        return order
    cum = np.cumsum(second / total)
    over = np.flatnonzero(cum > z)
    n = int(over[0]) + 1 if over.size else len(order)
    return order[: max(n, 1)]


class NumpyStage:
    """A stateless llama sampler whose apply runs `fn` on the candidates in numpy.

    `fn(logits)` edits the candidates' logits in place (masking with -inf); it may instead
    return indices to keep (in order), and the candidate array is cut to those.
    The iface must outlive every sampler made from it, clones included: the owner
    (a SeqSampler) keeps this object until its chain and snapshots are freed.
    """

    def __init__(self, name: str, fn: Callable[[Logits], npt.NDArray[np.intp] | None]) -> None:
        self._fn = fn
        self._name = name.encode()
        self._iface = lc.llama_sampler_i()
        self._cb_name = lc.llama_sampler_i_name(lambda _s: self._name)
        self._cb_apply = lc.llama_sampler_i_apply(self._apply)
        self._iface.name = self._cb_name
        self._iface.apply = self._cb_apply

    def make(self) -> Any:
        """A new llama sampler (owned by whoever adds it to a chain)."""
        return lc.llama_sampler_init(ctypes.pointer(self._iface), None)

    def _apply(self, _smpl: Any, cur_p: Any) -> None:
        cur = cur_p.contents
        n = int(cur.size)
        if n == 0:
            return
        buf = (lc.llama_token_data * n).from_address(ctypes.addressof(cur.data.contents))
        view = np.frombuffer(memoryview(buf), dtype=TOKEN_DATA)
        keep = self._fn(view["logit"])  # edits the candidates' logits in place
        if keep is not None:
            kept = view[keep]  # a copy (fancy indexing), then written back as the head
            view[: len(kept)] = kept
            cur.size = len(kept)
        cur.sorted = False
        cur.selected = -1
