"""/v1/completions: raw prompts, token prompts, batches, echo, logprob shape, errors."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.api.conftest import Api
from tests.api.fake_engine import REPLY


def complete(api: Api, body: dict[str, Any], stream: bool) -> tuple[httpx.Response, Any]:
    body = {"model": "fake", "prompt": "Once upon", **body}
    if not stream:
        r = api.client.post("/v1/completions", json=body)
        return r, r.json()
    with api.client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        raw = r.read().decode()
    if r.status_code != 200:
        return r, json.loads(raw)
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for line in raw.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        assert chunk["object"] == "text_completion"
        usage = chunk.get("usage") or usage
        for c in chunk["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            if c.get("finish_reason"):
                finish[c["index"]] = c["finish_reason"]
    choices = [{"index": i, "text": texts[i], "finish_reason": finish.get(i)} for i in texts]
    return r, {"choices": choices, "usage": usage}


def test_text_prompt_is_used_raw(api: Api, stream: bool) -> None:
    r, body = complete(api, {}, stream)
    assert r.status_code == 200
    assert body["choices"][0]["text"] == REPLY
    assert body["choices"][0]["finish_reason"] == "stop"
    tokens = api.engine.requests[-1].prompt_tokens
    assert tokens == [0] + [ord(c) for c in "Once upon"]  # BOS + the text, no template
    assert body["usage"]["prompt_tokens"] == len(tokens)


def test_token_prompt_and_echo(api: Api, stream: bool) -> None:
    ids = [ord(c) for c in "Hey"]
    _, body = complete(api, {"prompt": ids, "echo": True, "max_tokens": 3}, stream)
    assert body["choices"][0]["text"] == "Hey" + REPLY[:3]
    assert api.engine.requests[-1].prompt_tokens == ids


def test_batch_of_prompts_gives_indexed_choices(api: Api, stream: bool) -> None:
    _, body = complete(api, {"prompt": ["a", "b"], "n": 2, "max_tokens": 4}, stream)
    assert sorted(c["index"] for c in body["choices"]) == [0, 1, 2, 3]
    assert all(c["text"] == REPLY[:4] for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 16


def test_out_of_vocab_token_prompt_is_400(api: Api) -> None:
    r, body = complete(api, {"prompt": [1, 5000]}, False)
    assert r.status_code == 400 and body["error"]["param"] == "prompt"


def test_empty_prompt_list_is_400(api: Api) -> None:
    r, body = complete(api, {"prompt": []}, False)
    assert r.status_code == 400 and body["error"]["param"] == "prompt"


def test_too_long_prompt_is_400_without_middle_out(api: Api) -> None:
    r, body = complete(api, {"prompt": "x" * 300, "transforms": []}, False)
    assert r.status_code == 400 and body["error"]["param"] == "prompt"


def test_middle_out_keeps_head_and_tail_of_a_long_prompt(api: Api) -> None:
    r, _ = complete(api, {"prompt": "H" * 200 + "T" * 200, "max_tokens": 16}, False)
    assert r.status_code == 200
    tokens = api.engine.requests[-1].prompt_tokens
    assert len(tokens) == 256 - 16 and tokens[-1] == ord("T") and ord("H") in tokens


def test_suffix_is_reported_as_ignored(api: Api) -> None:
    r, _ = complete(api, {"suffix": "end"}, False)
    assert r.headers["x-hostler-ignored-params"] == "suffix"


def test_also_under_openrouter_prefix(api: Api) -> None:
    r = api.client.post("/api/v1/completions", json={"model": "fake", "prompt": "x"})
    assert r.status_code == 200 and r.json()["object"] == "text_completion"


def test_too_large_max_tokens_reports_the_real_prompt_length(api: Api) -> None:
    r = api.client.post(
        "/v1/completions", json={"model": "fake", "prompt": "hello there", "max_tokens": 300}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert "prompt (12 tokens)" in r.json()["error"]["message"]
