"""Prompt caches on the real engine: RAM and disk restores, chunk reuse, bounds, bad files."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e

# Greedy tokens may differ where the top two are this close (see test_smollm2.NEAR_TIE):
# llama.cpp's CPU kernels are not batch-invariant, and a restored state was computed
# in another batch.
NEAR_TIE = 0.5


def _chat(n: int) -> list[dict[str, str]]:
    """A distinct chat of a few hundred tokens."""
    lines = [
        f"Note {i} of chat {n}: the {['red', 'green', 'blue'][i % 3]} fox {i * n}."
        for i in range(40)
    ]
    return [
        {"role": "system", "content": f"You are assistant number {n}. " + " ".join(lines)},
        {"role": "user", "content": f"Tell me a short story about chat {n}."},
    ]


def _ask(url: str, messages: list[dict[str, str]], max_tokens: int = 24) -> dict[str, Any]:
    body = {
        "model": "smollm2-135m",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _same_greedy(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Equal token for token, except from a first divergence at a near-tie."""
    ta = a["choices"][0]["logprobs"]["content"]
    tb = b["choices"][0]["logprobs"]["content"]
    for x, y in zip(ta, tb, strict=False):
        if x["token"] != y["token"]:
            top = x["top_logprobs"]
            margin = top[0]["logprob"] - top[1]["logprob"] if len(top) > 1 else 99.0
            assert margin < NEAR_TIE, (a["choices"][0], b["choices"][0])
            return
    assert len(ta) == len(tb)


def _cached(resp: dict[str, Any]) -> int:
    return int(resp["usage"]["prompt_tokens_details"]["cached_tokens"])


def _cache_health(url: str) -> dict[str, Any]:
    h = httpx.get(url + "/health").json()
    return dict(h["models"]["smollm2-135m"]["cache"])


@pytest.fixture
def one_slot(tmp_path: Path) -> Iterator[Server]:
    server = Server(tmp_path / "log", "--slots", "1", "--cache-dir", str(tmp_path / "cache"))
    yield server
    assert server.stop() == 0, server.log.read_text()[-3000:]


def test_ram_restore_equals_a_fresh_prefill(one_slot: Server) -> None:
    url = one_slot.url
    first = _ask(url, _chat(1))
    assert _cached(first) == 0
    _ask(url, _chat(2))  # takes the only slot: chat 1 is saved to the cache
    again = _ask(url, _chat(1))
    assert _cached(again) >= first["usage"]["prompt_tokens"] - 1
    _same_greedy(first, again)
    cache = _cache_health(url)
    assert cache["ram"]["hits"] >= 1 and cache["ram"]["saves"] >= 1


def test_disk_restore_after_restart_and_bad_files_are_ignored(tmp_path: Path) -> None:
    args = ("--slots", "1", "--cache-dir", str(tmp_path / "cache"))
    server = Server(tmp_path / "log1", *args)
    first = _ask(server.url, _chat(3))
    _ask(server.url, _chat(4))
    assert server.stop() == 0
    files = sorted((tmp_path / "cache").rglob("*.kv"))
    assert len(files) >= 2  # chat 3 (saved when evicted) and chat 4 (saved at shutdown)

    server = Server(tmp_path / "log2", *args)
    try:
        again = _ask(server.url, _chat(3))
        assert _cached(again) >= first["usage"]["prompt_tokens"] - 1
        _same_greedy(first, again)
        assert _cache_health(server.url)["disk"]["hits"] == 1
    finally:
        assert server.stop() == 0

    # Damage every file: truncated, flipped bytes, a foreign file. None may be loaded.
    files = sorted((tmp_path / "cache").rglob("*.kv"))
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])
    for f in files[1:]:
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        f.write_bytes(bytes(raw))
    (files[0].parent / ("0" * 32 + ".kv")).write_bytes(b"not a cache entry at all")
    server = Server(tmp_path / "log3", *args)
    try:
        fresh = _ask(server.url, _chat(3))
        assert _cached(fresh) == 0
        _same_greedy(first, fresh)
        _ask(server.url, _chat(4))
        disk = _cache_health(server.url)["disk"]
        assert disk["rejected"] >= 2 and disk["hits"] == 0
    finally:
        assert server.stop() == 0


def test_cache_sizes_stay_within_limits(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    server = Server(
        tmp_path / "log",
        "--slots", "1", "--cache-dir", str(cache_dir),
        "--cache-ram-mib", "40", "--cache-disk-gib", "0.05",
    )  # fmt: skip
    try:
        for n in range(10, 16):
            _ask(server.url, _chat(n), max_tokens=4)
        deadline = time.monotonic() + 20  # the disk tier writes in the background
        while True:
            cache = _cache_health(server.url)
            if cache["disk"]["evictions"] > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert 0 < cache["ram"]["bytes"] <= 40 * 2**20
        assert cache["ram"]["evictions"] > 0
        assert 0 < cache["disk"]["bytes"] <= 0.05 * 2**30 and cache["disk"]["evictions"] > 0
    finally:
        assert server.stop() == 0
    on_disk = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file())
    assert 0 < on_disk <= 0.05 * 2**30


def test_chunk_reuse_after_trimming(tmp_path: Path) -> None:
    server = Server(
        tmp_path / "log", "--slots", "1", "--cache-reuse", "16",
        "--cache-ram-mib", "0", "--cache-disk-gib", "0",
    )  # fmt: skip
    try:
        card = {"role": "system", "content": "You are Mira, a ship's cat. " * 8}
        turns: list[dict[str, str]] = []
        for i in range(6):
            turns += [
                {"role": "user", "content": f"Question {i}: what did you see on deck {i}? " * 3},
                {"role": "assistant", "content": f"On deck {i} I saw a gull and a rope. " * 3},
            ]
        full = _ask(server.url, [card, *turns, {"role": "user", "content": "And then?"}])
        # The frontend drops the oldest exchange and adds a new message.
        trimmed = [card, *turns[2:], {"role": "user", "content": "And then?"}]
        resp = _ask(server.url, trimmed)
        card_tokens = 80
        assert _cached(resp) > card_tokens + 100  # the kept messages were shifted, not re-read
        assert resp["choices"][0]["message"]["content"]
        stats = httpx.get(server.url + "/health").json()["models"]["smollm2-135m"]
        assert stats["reused_chunk_tokens"] > 100
        assert full["usage"]["prompt_tokens"] > resp["usage"]["prompt_tokens"]
    finally:
        assert server.stop() == 0
