"""N-gram speculation on SmolLM2: the text is exactly plain decoding's (greedy), with
every feature that watches tokens (bans, stops, grammar, n > 1), streamed or not, alone
and among concurrent streams; and what it drafted is reported.

Each comparison runs one request with `speculative: false` and the same with
`speculative: true` (draft whenever the text repeats) on one server.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Server

FIELDS = [f"field_{c}" for c in "abcdefgh"]
# A ~60-line file, asked back with one rename: most of the answer copies the prompt.
CODE = "\n".join(
    f"def load_{name}(record, count):\n"
    f"    value = record.get('{name}', count)\n"
    f"    if value is None:\n"
    f"        return count\n"
    f"    return value * {i + 2}\n"
    for i, name in enumerate(FIELDS)
)


def edit(to: str = "quantity") -> str:
    """The file asked back with `count` renamed to `to`. A test that compares texts asks
    for a rename of its own: a prompt that ends as an earlier one did would draft that
    one's answer from the history, in batches of other shapes than its plain twin's."""
    return (
        "Here is a Python file:\n```python\n" + CODE + "\n```\n"
        f"The same file again, with every `count` renamed to `{to}`:\n```python\n"
    )


EDIT = edit()
PROSE = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("speculation")
    server = Server(
        folder / "server.log", "--slots", "8", "--speculative", "auto",
        "--cache-dir", str(folder / "cache"),
    )  # fmt: skip
    try:
        yield server.url
    finally:
        assert server.stop(timeout=30) == 0


def complete(url: str, body: dict[str, Any], speculative: bool) -> dict[str, Any]:
    """A request, streamed or not; its text per choice and its generation stats."""
    body = {"model": "smollm2-135m", "temperature": 0, **body, "speculative": speculative}
    route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    texts: dict[int, str] = {}
    if body.get("stream"):
        gen_id = None
        with httpx.stream("POST", url + route, json=body, timeout=300) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                gen_id = chunk["id"]
                for c in chunk["choices"]:
                    piece = c["delta"].get("content") if "delta" in c else c.get("text")
                    texts[c["index"]] = texts.get(c["index"], "") + (piece or "")
    else:
        r = httpx.post(url + route, json=body, timeout=300)
        assert r.status_code == 200, r.text
        out = r.json()
        gen_id = out["id"]
        for c in out["choices"]:
            texts[c["index"]] = c["message"]["content"] if "message" in c else c["text"]
    stats = httpx.get(url + "/api/v1/generation", params={"id": gen_id}).json()["data"]
    return {"texts": [texts[i] for i in sorted(texts)], "stats": stats}


def same_both_ways(url: str, body: dict[str, Any]) -> dict[str, Any]:
    plain = complete(url, body, speculative=False)
    spec = complete(url, body, speculative=True)
    assert spec["texts"] == plain["texts"]
    assert plain["stats"]["speculative"]["drafted_tokens"] == 0
    return spec


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_edit_is_identical_and_drafts(url: str, stream: bool) -> None:
    spec = same_both_ways(url, {"prompt": EDIT, "max_tokens": 300, "stream": stream})
    drafted = spec["stats"]["speculative"]
    assert drafted["drafted_tokens"] > 50 and drafted["accepted_tokens"] > 25, drafted


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_prose_is_identical(url: str, stream: bool) -> None:
    # A story of its own per variant: the second would copy the first from the history
    # in long drafts, whose batches can flip this model's many greedy near-ties (see
    # test_a_request_sent_again_drafts_from_the_first).
    story = [{"role": "user", "content": PROSE[0]["content"] + (" Streamed." if stream else "")}]
    same_both_ways(url, {"messages": story, "max_tokens": 200, "stream": stream})


def test_a_request_sent_again_drafts_from_the_first(url: str) -> None:
    """A finished request's text is drafted from by the next one that writes it again:
    nearly the whole answer comes in drafts, and (an edit: no near-ties) it is the same."""
    body = {"prompt": edit("tally"), "max_tokens": 200}
    plain = complete(url, body, speculative=False)
    first = complete(url, body, speculative=True)
    again = complete(url, body, speculative=True)
    assert again["texts"] == first["texts"] == plain["texts"]
    kept = again["stats"]["speculative"]["accepted_tokens"]
    assert kept > 0.8 * again["stats"]["tokens_completion"], again["stats"]
    assert kept > first["stats"]["speculative"]["accepted_tokens"], first["stats"]


def test_stops_bans_and_n(url: str) -> None:
    spec = same_both_ways(
        url,
        {
            "prompt": edit("amount"),
            "max_tokens": 250,
            "n": 2,
            "stop": ["field_e"],
            "banned_strings": ["* 4"],
        },
    )
    assert len(spec["texts"]) == 2
    assert all("field_e" not in t and "* 4" not in t for t in spec["texts"])


def test_grammar_dry_and_logprobs(url: str) -> None:
    grammar = 'root ::= line+\nline ::= [a-z_ ().:=,*0-9\'"]+ "\\n"'
    same_both_ways(
        url,
        {
            "prompt": edit("total"),
            "max_tokens": 150,
            "grammar": grammar,
            "dry_multiplier": 0.5,
            "logprobs": 2,
        },
    )


def test_eight_concurrent_streams_mixing_both(url: str) -> None:
    """Four edits and four stories at once, all speculating. The edits (confident
    copies) are exactly their text alone; a story is checked for its length only: a
    greedy near-tie may go another way in a batch of several even without speculation
    (llama.cpp's kernels are not batch-invariant; see README, Speculative decoding)."""
    bodies = [
        {"prompt": EDIT, "max_tokens": 160, "stream": i % 2 == 0, "logit_bias": {"2": -100}}
        if i < 4
        else {"messages": PROSE, "max_tokens": 120, "stream": i % 2 == 0, "ignore_eos": True}
        for i in range(8)
    ]
    alone = [complete(url, b, speculative=False) for b in bodies]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda b: complete(url, b, speculative=True), bodies))
    for i, (a, t) in enumerate(zip(alone, together, strict=True)):
        if i < 4:
            assert t["texts"] == a["texts"]
        assert t["stats"]["tokens_completion"] == a["stats"]["tokens_completion"]
    assert sum(t["stats"]["speculative"]["drafted_tokens"] for t in together[:4]) > 0


def test_acceptance_is_reported(url: str) -> None:
    complete(url, {"prompt": EDIT, "max_tokens": 200}, speculative=True)
    health = httpx.get(url + "/health").json()["models"]["smollm2-135m"]
    assert health["speculative"] == "auto"
    assert health["draft_tokens"] > 0 and 0 < health["draft_acceptance"] <= 1
    metrics = httpx.get(url + "/metrics").text
    assert 'hostler_speculative_drafted_tokens_total{model="smollm2-135m"}' in metrics
    assert 'hostler_speculative_accepted_tokens_total{model="smollm2-135m"}' in metrics


def test_seeded_speculation_is_reproducible(url: str) -> None:
    """The same seeded request twice gives the same text. A prompt of its own, read once
    first: both runs then decode from the same cached cells (cells computed in another
    batch would differ slightly: see test_eight_concurrent_streams_mixing_both)."""
    body = {"prompt": "# again\n" + EDIT, "max_tokens": 120, "temperature": 0.8, "seed": 7}
    complete(url, {**body, "max_tokens": 1}, speculative=False)
    first = complete(url, body, speculative=True)
    again = complete(url, body, speculative=True)
    assert first["texts"] == again["texts"]
    assert first["stats"]["speculative"] == again["stats"]["speculative"]
