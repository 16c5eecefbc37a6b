"""Prompt cache tiers and chunk-reuse planning, without a model."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from server.engine.cache import DiskTier, PromptCache
from server.engine.reuse import Chunk, plan_reuse, reused_tokens

KEY = b"k" * 32


def toks(*runs: range | list[int]) -> np.ndarray:
    out: list[int] = []
    for r in runs:
        out.extend(r)
    return np.asarray(out, dtype=np.int32)


# -- chunk reuse ------------------------------------------------------------------------


def test_trimmed_chat_keeps_the_messages_after_the_dropped_one() -> None:
    card, dropped, kept, reply = range(0, 50), range(100, 140), range(200, 400), range(900, 930)
    cached = toks(card, dropped, kept, reply)
    prompt = toks(card, kept, range(500, 520))
    plan = plan_reuse(cached, prompt, 50, min_run=16)
    assert plan == [Chunk(src=90, dst=50, n=200)]
    assert reused_tokens(50, plan) == 250


def test_short_runs_and_the_last_token_are_not_reused() -> None:
    cached = toks(range(0, 10), range(100, 110), range(200, 205))
    prompt = toks(range(0, 10), range(200, 205))
    assert plan_reuse(cached, prompt, 10, min_run=8) == []  # a run of 5 < 8
    cached = toks(range(0, 10), range(100, 110), range(200, 220))
    prompt = toks(range(0, 10), range(200, 220))
    plan = plan_reuse(cached, prompt, 10, min_run=8)
    assert reused_tokens(10, plan) == len(prompt) - 1  # the last token is decoded again


def test_several_runs_in_order() -> None:
    a, b, c = range(100, 130), range(200, 230), range(300, 330)
    cached = toks(range(10), range(50, 60), a, range(60, 70), b, c)
    prompt = toks(range(10), a, b, range(999, 1001))
    plan = plan_reuse(cached, prompt, 10, min_run=8)
    assert [(p.dst, p.n) for p in plan] == [(10, 30), (40, 30)]
    assert all(p.dst <= p.src for p in plan)


def test_reuse_off() -> None:
    assert plan_reuse(toks(range(100)), toks(range(100)), 0, min_run=0) == []


# -- RAM tier ---------------------------------------------------------------------------


def test_ram_lru_stays_within_its_limit() -> None:
    cache = PromptCache(ram_bytes=3000)
    for i in range(5):
        cache.save(toks(range(i * 1000, i * 1000 + 64)), bytes([i]) * 1000)
        assert cache.stats.bytes <= 3000
    assert cache.stats.entries == 3 and cache.stats.evictions == 2
    n, entry = cache.best(toks(range(4000, 4064), [7]))
    assert n == 64 and entry is not None and cache.state_of(entry) == bytes([4]) * 1000
    assert cache.best(toks(range(0, 64)))[1] is None  # evicted


def test_a_longer_entry_replaces_its_prefix_and_tiny_ones_are_skipped() -> None:
    cache = PromptCache(ram_bytes=10**6)
    cache.save(toks(range(100)), b"a" * 10)
    cache.save(toks(range(150)), b"b" * 10)
    assert cache.stats.entries == 1
    cache.save(toks(range(120)), b"c" * 10)  # covered by the longer one
    assert cache.stats.entries == 1
    cache.save(toks(range(5000, 5010)), b"d")  # shorter than MIN_TOKENS
    assert cache.stats.entries == 1


# -- disk tier --------------------------------------------------------------------------


def _disk(folder: Path, limit: int = 10**7, key: bytes = KEY) -> DiskTier:
    return DiskTier(folder, key, limit)


def test_disk_round_trip_and_restart(tmp_path: Path) -> None:
    disk = _disk(tmp_path)
    cache = PromptCache(0, disk)  # RAM off: everything comes from disk
    state = bytes(range(256)) * 40
    cache.save(toks(range(64)), state)
    disk.flush()
    disk.close()
    again = PromptCache(0, _disk(tmp_path))
    n, entry = again.best(toks(range(64), [1, 2]))
    assert n == 64 and entry is not None
    assert again.state_of(entry) == state
    assert again.disk is not None and again.disk.stats.hits == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign", "tmp"])
def test_damaged_files_are_ignored_and_removed(tmp_path: Path, damage: str) -> None:
    disk = _disk(tmp_path)
    PromptCache(0, disk).save(toks(range(64)), b"s" * 4096)
    disk.flush()
    disk.close()
    (path,) = tmp_path.glob("*.kv")
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(raw[:-100])
    elif damage == "flip":
        raw[len(raw) // 2] ^= 1
        path.write_bytes(raw)
    elif damage == "tmp":
        (tmp_path / "half-written.tmp").write_bytes(b"x")
    disk = _disk(tmp_path, key=b"other model".ljust(32) if damage == "foreign" else KEY)
    cache = PromptCache(0, disk)
    _, entry = cache.best(toks(range(64)))
    if damage == "tmp":
        assert entry is not None and not list(tmp_path.glob("*.tmp"))
        disk.close()
        return
    if entry is not None:  # a flipped byte in the body is only found on load
        assert cache.state_of(entry) is None
    assert not list(tmp_path.glob("*.kv")) and disk.stats.rejected == 1
    disk.close()


def test_disk_lru_stays_within_its_limit(tmp_path: Path) -> None:
    disk = _disk(tmp_path, limit=20_000)
    cache = PromptCache(0, disk)
    for i in range(6):
        cache.save(toks(range(i * 100, i * 100 + 64)), bytes([i]) * 5000)
        disk.flush()
        time.sleep(0.01)
    files = list(tmp_path.glob("*.kv"))
    assert sum(f.stat().st_size for f in files) <= 20_000
    assert disk.stats.bytes <= 20_000 and disk.stats.evictions >= 2
    disk.close()
