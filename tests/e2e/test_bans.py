"""Banned phrases on the real engine: the phrase never reaches the client, streamed or not."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.e2e

STORY = [{"role": "user", "content": "Write a short story about a knight and a dragon."}]
GREEDY = {"messages": STORY, "temperature": 0, "max_tokens": 60}


def _chat(url: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return dict(r.json()["choices"][0])


def _stream(url: str, body: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """The content deltas, and the last choice (with its finish reason)."""
    deltas: list[str] = []
    last: dict[str, Any] = {}
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                deltas.append(choice["delta"].get("content") or "")
                if choice.get("finish_reason"):
                    last = choice
    return deltas, last


@pytest.fixture(scope="module")
def baseline(server_url: str) -> str:
    text = str(_chat(server_url, GREEDY)["message"]["content"])
    assert len(text.split()) > 20
    return text


def _phrase(text: str, start: int, words: int) -> str:
    """`words` words of the greedy reply from word `start` (several tokens long)."""
    return " ".join(text.split()[start : start + words])


def test_a_banned_phrase_changes_the_reply_and_never_appears(
    server_url: str, baseline: str
) -> None:
    phrase = _phrase(baseline, 4, 3)
    choice = _chat(server_url, {**GREEDY, "banned_strings": [phrase]})
    text = choice["message"]["content"]
    assert phrase.lower() not in text.lower()
    assert text != baseline
    # Up to where the phrase began, the greedy reply is unchanged.
    assert text.startswith(baseline[: baseline.index(phrase)].rstrip())


def test_streamed_text_never_shows_the_phrase_even_in_part_across_chunks(
    server_url: str, baseline: str
) -> None:
    phrase = _phrase(baseline, 4, 3)
    deltas, last = _stream(server_url, {**GREEDY, "banned_strings": [phrase.upper()]})
    text = "".join(deltas)
    assert phrase.lower() not in text.lower()
    assert last["finish_reason"] == "length"
    assert len([d for d in deltas if d]) > 5  # it did stream, not just one piece at the end
    same = _chat(server_url, {**GREEDY, "banned_strings": [phrase.upper()]})
    assert text == same["message"]["content"]  # streamed or not: the same reply


def test_a_banned_regex(server_url: str, baseline: str) -> None:
    word = max(re.findall(r"[A-Za-z]{5,}", baseline)[:12], key=len)
    pattern = rf"\b{word[:-1]}\w*"
    ban = {"regex": pattern}
    text = _chat(server_url, {**GREEDY, "banned_strings": [ban]})["message"]["content"]
    assert not re.search(pattern, text, re.IGNORECASE), (pattern, text)
    deltas, _ = _stream(server_url, {**GREEDY, "banned_strings": [ban]})
    assert not re.search(pattern, "".join(deltas), re.IGNORECASE)


def test_eight_concurrent_streams_each_ban_their_own_phrase(server_url: str, baseline: str) -> None:
    phrases = [_phrase(baseline, 2 + 2 * i, 2) for i in range(8)]

    def run(phrase: str) -> str:
        deltas, _ = _stream(server_url, {**GREEDY, "max_tokens": 40, "banned_strings": [phrase]})
        return "".join(deltas)

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(run, phrases))
    for phrase, text in zip(phrases, texts, strict=True):
        assert phrase.lower() not in text.lower(), (phrase, text)
        assert text != baseline[: len(text)]  # each was steered away from the greedy reply


def test_a_ban_that_cannot_be_avoided_ends_cleanly_and_says_so(server_url: str) -> None:
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 20,
        "ignore_eos": True,
        "banned_strings": [{"regex": r"[\s\S]"}],  # every character
    }
    choice = _chat(server_url, body)
    assert choice["finish_reason"] == "stop"
    assert choice["native_finish_reason"] == "banned_string"
    assert choice["message"]["content"] == ""
    _, last = _stream(server_url, body)
    assert last["native_finish_reason"] == "banned_string"


def test_logit_bias_by_text_bans_a_word(server_url: str, baseline: str) -> None:
    word = re.findall(r"[A-Za-z]{4,}", baseline)[1]
    text = _chat(server_url, {**GREEDY, "logit_bias": {word: -100}})["message"]["content"]
    assert not re.search(rf"\b{word}\b", text), (word, text)
