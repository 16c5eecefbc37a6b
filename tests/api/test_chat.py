"""The chat endpoint as a client sees it, every case streamed and not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.api.conftest import Api, make_api
from tests.api.fake_engine import REPLY


def test_chat_returns_text_and_usage(api: Api, stream: bool) -> None:
    r, body = api.chat({"max_tokens": 100}, stream)
    assert r.status_code == 200
    assert body["choices"][0]["message"]["content"] == REPLY
    assert body["choices"][0]["finish_reason"] == "stop"
    u = body["usage"]
    assert (
        u["completion_tokens"] > 0
        and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    )
    assert "cached_tokens" in u["prompt_tokens_details"]
    if stream:
        assert body["done"]


def test_alias_selects_model_and_is_echoed(api: Api, stream: bool) -> None:
    r, body = api.chat({"model": "org/fake"}, stream)
    assert r.status_code == 200 and body["model"] == "org/fake"


def test_max_tokens_gives_length(api: Api, stream: bool) -> None:
    _, body = api.chat({"max_tokens": 5}, stream)
    assert body["choices"][0]["message"]["content"] == REPLY[:5]
    assert body["choices"][0]["finish_reason"] == "length"


def test_stop_string_never_emitted(api: Api, stream: bool) -> None:
    _, body = api.chat({"stop": ["friend"]}, stream)
    assert body["choices"][0]["message"]["content"] == "Hello there, "
    assert body["choices"][0]["finish_reason"] == "stop"


def test_template_stop_becomes_stop_token(api: Api, stream: bool) -> None:
    api.chat({}, stream)
    assert 1 in api.engine.requests[-1].stop_token_ids


def test_prompt_uses_template_and_single_bos(api: Api, stream: bool) -> None:
    api.chat({}, stream)
    toks = api.engine.requests[-1].prompt_tokens
    assert toks[0] == 0 and toks.count(0) == 1
    text = "".join(chr(t) for t in toks[1:])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_assistant_prefill_and_names(api: Api, stream: bool) -> None:
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}], "name": "Bob"},
        {"role": "assistant", "content": "Well,"},
    ]
    api.chat({"messages": msgs}, stream)
    text = "".join(chr(t) for t in api.engine.requests[-1].prompt_tokens[1:])
    assert text.endswith("<|im_start|>user\nBob: Hi<|im_end|>\n<|im_start|>assistant\nWell,")


def test_n_choices(api: Api, stream: bool) -> None:
    _, body = api.chat({"n": 2}, stream)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["message"]["content"] == REPLY for c in body["choices"])


def test_model_defaults_and_request_override(api: Api, stream: bool) -> None:
    api.chat({}, stream)
    assert api.engine.requests[-1].params.temperature == 0.7
    api.chat({"temperature": 0.2, "seed": 7}, stream)
    p = api.engine.requests[-1].params
    assert p.temperature == 0.2 and p.seed == 7


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"stream_options": "yes"}, "stream_options"),
    ],
)
def test_bad_parameter_is_400_naming_it(api: Api, stream: bool, patch: dict, param: str) -> None:
    r, body = api.chat(patch, stream)
    assert r.status_code == 400, body
    err = body["error"]
    assert err["code"] == 400 and err["type"] == "invalid_request_error"
    assert err["param"] == param, err


@pytest.mark.parametrize("raw", ["[1, 2]", '"hello"', "42", "{not json", "null"])
def test_body_not_an_object_is_400(api: Api, raw: str) -> None:
    r = api.client.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == 400


def test_unknown_model_is_404(api: Api, stream: bool) -> None:
    r, body = api.chat({"model": "nope"}, stream)
    assert r.status_code == 404
    assert body["error"]["code"] == 404 and body["error"]["param"] == "model"


def test_prompt_too_long_is_400_before_stream(api: Api, stream: bool) -> None:
    long = [{"role": "user", "content": "x" * 400}]
    r, body = api.chat({"messages": long, "transforms": []}, stream)
    assert r.status_code == 400
    assert body["error"]["param"] == "messages"


def test_middle_out_drops_middle_messages_to_fit(api: Api, stream: bool) -> None:
    turns = [{"role": "system", "content": "SYS"}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn{i} " + "y" * 30}
        for i in range(12)
    ]
    turns.append({"role": "user", "content": "LAST"})
    r, _ = api.chat({"messages": turns, "max_tokens": 20}, stream)
    assert r.status_code == 200
    prompt = "".join(chr(t) for t in api.engine.requests[-1].prompt_tokens[1:])
    assert "SYS" in prompt and "LAST" in prompt and "turn11" in prompt
    assert "turn5" not in prompt  # the middle went first
    assert len(api.engine.requests[-1].prompt_tokens) + 20 <= 256


def test_middle_out_shortens_a_single_long_message(api: Api, stream: bool) -> None:
    text = "A" * 150 + "B" * 150 + "C" * 150
    r, _ = api.chat({"messages": [{"role": "user", "content": text}]}, stream)
    assert r.status_code == 200
    prompt = "".join(chr(t) for t in api.engine.requests[-1].prompt_tokens[1:])
    assert prompt.count("A") > 50 and prompt.count("C") > 50 and prompt.count("B") < 100


def test_prompt_plus_max_tokens_over_context_is_400(api: Api, stream: bool) -> None:
    r, body = api.chat({"max_tokens": 250}, stream)
    assert r.status_code == 400 and body["error"]["param"] == "max_tokens"


def test_queue_full_is_429_with_retry_after(api: Api, stream: bool) -> None:
    api.chat({}, False)
    api.engine.max_queue = 0
    r, body = api.chat({}, stream)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert body["error"]["type"] == "rate_limit_error"


def test_engine_error(api: Api, stream: bool) -> None:
    api.chat({}, False)
    api.engine.fail_at = 3
    r, body = api.chat({}, stream)
    if stream:
        assert r.status_code == 200 and body["error"]["message"] == "boom" and body["done"]
    else:
        assert r.status_code == 500 and body["error"]["code"] == 500


def test_ignored_params_header(api: Api, stream: bool) -> None:
    r, _ = api.chat({"frobnicate": 1, "provider": {"order": ["x"]}}, stream)
    assert r.headers["x-hostler-ignored-params"] == "frobnicate,provider"
    r, _ = api.chat({}, stream)
    assert "x-hostler-ignored-params" not in r.headers


def test_fallback_models(api: Api, stream: bool) -> None:
    r, body = api.chat(
        {"model": "nope", "models": ["broken", "org/fake"], "route": "fallback"}, stream
    )
    assert r.status_code == 200 and body["model"] == "org/fake"


def test_openrouter_prefix_and_generation_stats(api: Api) -> None:
    r = api.client.post(
        "/api/v1/chat/completions",
        json={"model": "fake", "messages": [{"role": "user", "content": "Hi"}]},
        headers={"HTTP-Referer": "https://app.example", "X-Title": "My App"},
    )
    assert r.status_code == 200
    gen = api.client.get("/api/v1/generation", params={"id": r.json()["id"]}).json()["data"]
    assert gen["model"] == "fake" and gen["tokens_completion"] > 0
    assert gen["origin"] == "https://app.example" and gen["app_title"] == "My App"
    assert api.client.get("/api/v1/generation", params={"id": "gen-x"}).status_code == 404


def test_models_list(api: Api) -> None:
    data = api.client.get("/v1/models").json()["data"]
    ids = [m["id"] for m in data]
    assert ids == ["fake"]  # once, and only what can load (the others' files are absent)
    fake = data[0]
    assert fake["aliases"] == ["org/fake"] and fake["hostler"]["downloaded"]
    every = api.client.get("/v1/models", params={"all": "true"}).json()["data"]
    assert [m["id"] for m in every] == ["fake", "other", "broken", "absent"]
    assert not next(m for m in every if m["id"] == "other")["hostler"]["downloaded"]
    assert fake["object"] == "model" and fake["context_length"] == 256
    assert fake["pricing"]["prompt"] == "0" and "min_p" in fake["supported_parameters"]


def test_health(api: Api) -> None:
    assert api.client.get("/health").json()["status"] == "ok"


def test_unknown_route_is_404_in_error_shape(api: Api) -> None:
    r = api.client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404


def test_api_key(tmp_path: Path, stream: bool) -> None:
    for api in make_api(tmp_path, api_key="sekret"):
        r, body = api.chat({}, stream)
        assert r.status_code == 401 and body["error"]["type"] == "authentication_error"
        r, body = api.chat({}, stream, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r, _ = api.chat({}, stream, headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 200
        assert api.client.get("/health").status_code == 200
        assert api.client.get("/v1/models").status_code == 401


def test_applied_openrouter_params_are_not_reported(api: Api, stream: bool) -> None:
    r, _ = api.chat({"response_format": {"type": "json_object"}, "transforms": []}, stream)
    assert "x-hostler-ignored-params" not in r.headers


def test_sampler_order_names_the_orderable_stages(api: Api) -> None:
    r, body = api.chat({"sampler_order": ["top_k", "penalties"]}, False)
    assert r.status_code == 400 and body["error"]["param"] == "sampler_order"
    assert "penalties" in body["error"]["message"] and "min_p" in body["error"]["message"]
    r, _ = api.chat({"sampler_order": ["temperature", "min_p"]}, False)
    assert r.status_code == 200
    assert api.engine.requests[-1].params.sampler_order == ("temperature", "min_p")


def test_streamed_chunks_hold_one_choice_and_a_finish_reason_key(api: Api) -> None:
    body = {"model": "fake", "messages": [{"role": "user", "content": "Hi"}], "n": 2}
    for path, extra in (("/v1/chat/completions", {}), ("/v1/completions", {"prompt": "Hi"})):
        with api.client.stream("POST", path, json={**body, **extra, "stream": True}) as r:
            raw = r.read().decode()
        texts: dict[int, str] = {0: "", 1: ""}
        for line in raw.splitlines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert len(chunk["choices"]) <= 1
            for c in chunk["choices"]:
                assert "finish_reason" in c
                texts[c["index"]] += c.get("text") or c.get("delta", {}).get("content") or ""
        assert texts == {0: REPLY, 1: REPLY}, path


def test_logit_bias_outside_the_vocabulary_is_dropped_and_reported(api: Api, stream: bool) -> None:
    r, _ = api.chat({"logit_bias": {"5000": -100, "5": 3}}, stream)
    assert r.status_code == 200
    assert "logit_bias[5000]" in r.headers["x-hostler-ignored-params"]
    assert api.engine.requests[-1].params.logit_bias == {5: 3.0}


def test_openrouter_prompt_on_the_chat_route(api: Api, stream: bool) -> None:
    body = {"model": "fake", "prompt": "Once upon a time", "max_tokens": 50, "stop": ["friend"]}
    if not stream:
        r = api.client.post("/api/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        data = r.json()
        assert data["object"] == "chat.completion"
        assert data["choices"][0]["text"] == "Hello there, "
        assert data["choices"][0]["finish_reason"] == "stop"
        assert data["usage"]["completion_tokens"] > 0
    else:
        with api.client.stream(
            "POST", "/api/v1/chat/completions", json={**body, "stream": True}
        ) as r:
            raw = r.read().decode()
        chunks = [json.loads(x[6:]) for x in raw.splitlines() if x.startswith("data: {")]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "Hello there, "
        assert raw.rstrip().endswith("data: [DONE]")
    # The raw prompt reaches the engine as it is: no chat template around it.
    toks = api.engine.requests[-1].prompt_tokens
    assert "".join(chr(t) for t in toks[1:]) == "Once upon a time"


def test_chat_needs_messages_or_prompt(api: Api) -> None:
    r = api.client.post("/v1/chat/completions", json={"model": "fake"})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
