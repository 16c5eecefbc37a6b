"""The real engine under load: disconnect storms, queue overflow, no leaks."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.e2e

BODY = {
    "model": "smollm2-135m",
    "messages": [{"role": "user", "content": "Tell me about rivers."}],
    "temperature": 0.8,
}


def wait_idle(url: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(url + "/health").json()
        engine = health["models"]["smollm2-135m"]
        if (engine["slots_busy"] == 0 and engine["queued"] == 0) or time.monotonic() > deadline:
            return dict(health)
        time.sleep(0.2)


async def _one(client: httpx.AsyncClient, url: str, rng: random.Random) -> str:
    """A request that finishes, or is dropped mid-stream, or times out unstreamed."""
    mode = rng.choice(["finish", "drop", "drop", "timeout"])
    body = {**BODY, "max_tokens": rng.randint(4, 24), "seed": rng.randint(0, 9999)}
    if mode == "timeout":
        try:
            await client.post(url + "/v1/chat/completions", json=body, timeout=0.05)
        except httpx.TimeoutException:
            return "timeout"
        return "finish"
    body["stream"] = True
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code == 429:
            return "429"
        n = 0
        async for line in r.aiter_lines():
            n += line.startswith("data: ")
            if mode == "drop" and n >= rng.randint(1, 4):
                return "drop"
    return "finish"


def test_200_requests_with_random_disconnects_leak_nothing(server_url: str) -> None:
    wait_idle(server_url)
    rss_before = httpx.get(server_url + "/health").json()["rss_bytes"]
    rng = random.Random(7)

    async def storm() -> list[str]:
        limits = httpx.Limits(max_connections=8)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            sem = asyncio.Semaphore(8)

            async def guarded() -> str:
                async with sem:
                    return await _one(client, server_url, rng)

            return await asyncio.gather(*(guarded() for _ in range(200)))

    outcomes = asyncio.run(storm())
    assert len(outcomes) == 200 and {"finish", "drop"} <= set(outcomes)
    health = wait_idle(server_url)
    engine = health["models"]["smollm2-135m"]
    assert engine["slots_busy"] == 0 and engine["queued"] == 0
    # Memory: whatever the storm allocated is bounded (no per-request growth).
    if rss_before and health["rss_bytes"]:
        assert health["rss_bytes"] - rss_before < 64 * 2**20
    # And the server still answers normally.
    r = httpx.post(server_url + "/v1/chat/completions", json={**BODY, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_queue_overflow_is_429_with_retry_after(server_url: str) -> None:
    """4 slots + a queue of 8 (see conftest): a burst of 24 long streams overflows."""
    wait_idle(server_url)

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            body = {**BODY, "max_tokens": 200, "stream": True}
            answered = 0
            all_answered = asyncio.Event()

            async def first_response() -> httpx.Response:
                nonlocal answered
                async with client.stream(
                    "POST", server_url + "/v1/chat/completions", json=body
                ) as r:
                    if r.status_code != 200:
                        await r.aread()
                    answered += 1
                    if answered == 24:
                        all_answered.set()
                    # Hold accepted streams open until every request has its answer.
                    await asyncio.wait_for(all_answered.wait(), 60)
                    return r  # leaving the block drops the stream

            return await asyncio.gather(*(first_response() for _ in range(24)))

    responses = asyncio.run(burst())
    rejected = [r for r in responses if r.status_code == 429]
    assert rejected, [r.status_code for r in responses]
    assert all(r.status_code in (200, 429) for r in responses)
    assert rejected[0].headers["retry-after"]
    assert rejected[0].json()["error"]["type"] == "rate_limit_error"
    engine = wait_idle(server_url)["models"]["smollm2-135m"]
    assert engine["slots_busy"] == 0 and engine["queued"] == 0
