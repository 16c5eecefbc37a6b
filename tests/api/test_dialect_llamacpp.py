"""llama-server's native API, as SillyTavern's "llama.cpp" Text Completion type uses it."""

from __future__ import annotations

import json
from typing import Any

from tests.api.conftest import Api
from tests.api.fake_engine import REPLY

# What SillyTavern sends to /completion for its llama.cpp type, abridged.
BODY: dict[str, Any] = {
    "prompt": "Hi",
    "n_predict": 40,
    "max_tokens": 40,
    "temperature": 0.7,
    "top_k": 40,
    "top_p": 0.9,
    "min_p": 0.05,
    "repeat_penalty": 1.1,
    "repeat_last_n": 64,
    "samplers": ["top_k", "tfs_z", "typical_p", "top_p", "min_p", "temperature"],
    "logit_bias": [[5, -2.0], [7, False]],
    "dry_sequence_breakers": ["\n", ":"],
    "cache_prompt": True,
    "stop": ["friend"],
    "n_probs": 0,
    "seed": -1,
    "grammar": "",
    "api_type": "llamacpp",
}


def test_completion(api: Api) -> None:
    r = api.client.post("/completion", json=BODY)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["content"] == "Hello there, " and data["stop"] is True
    assert data["stop_type"] == "eos" and data["tokens_predicted"] > 0
    assert data["tokens_evaluated"] == len(api.engine.requests[-1].prompt_tokens)
    p = api.engine.requests[-1].params
    assert p.sampler_order == ("top_k", "tfs", "typical_p", "top_p", "min_p", "temperature")
    assert p.logit_bias == {5: -2.0, 7: float("-inf")}
    assert p.penalty_last_n == 64 and api.engine.requests[-1].max_tokens == 40


def test_completion_stream(api: Api) -> None:
    with api.client.stream("POST", "/completion", json={**BODY, "stream": True}) as r:
        raw = r.read().decode()
    events = [json.loads(x[6:]) for x in raw.splitlines() if x.startswith("data: {")]
    assert "".join(e["content"] for e in events) == "Hello there, "
    assert [e["stop"] for e in events].count(True) == 1 and events[-1]["stop"] is True
    assert events[-1]["tokens_predicted"] > 0


def test_completion_length_and_token_prompt(api: Api) -> None:
    r = api.client.post("/completion", json={"prompt": [72, 105], "n_predict": 3})
    data = r.json()
    assert data["content"] == REPLY[:3] and data["stop_type"] == "limit"
    assert api.engine.requests[-1].prompt_tokens == [72, 105]


def test_tokenize_detokenize_props(api: Api) -> None:
    r = api.client.post("/tokenize", json={"content": "Hi"})
    assert r.json()["tokens"] == [ord("H"), ord("i")]
    r = api.client.post("/tokenize", json={"content": "Hi", "with_pieces": True})
    assert r.json()["tokens"][0] == {"id": ord("H"), "piece": "H"}
    assert api.client.post("/detokenize", json={"tokens": [72, 105]}).json() == {"content": "Hi"}
    r = api.client.post("/detokenize", json={"tokens": [10**6]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    props = api.client.get("/props").json()
    assert props["default_generation_settings"]["n_ctx"] == api.engine.info.n_ctx
    assert props["total_slots"] == api.engine.info.slots


def test_native_routes_need_the_key(tmp_path: Any) -> None:
    from tests.api.conftest import make_api

    for api in make_api(tmp_path, api_key="sekret-key"):
        assert api.client.post("/completion", json=BODY).status_code == 401
        assert api.client.get("/props").status_code == 401


def test_vllm_tokenize_shapes(api: Api) -> None:
    """SillyTavern's vLLM and Aphrodite tokenizer calls: {model, prompt} or {model,
    messages}, expecting tokens, count and max_model_len."""
    for path in ("/tokenize", "/v1/tokenize"):
        r = api.client.post(path, json={"model": "fake", "prompt": "Hi"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tokens"] == [0, ord("H"), ord("i")]  # vLLM adds BOS by default
        assert body["count"] == 3 and body["max_model_len"] == 256
        msgs = {"model": "fake", "messages": [{"role": "user", "content": "Hi"}]}
        r = api.client.post(path, json=msgs)
        assert r.status_code == 200, r.text
        assert r.json()["count"] == len(r.json()["tokens"]) > 3  # the template's tokens too
    r = api.client.post("/v1/tokenize", json={"model": "fake"})
    assert r.status_code == 400
    r = api.client.post("/v1/tokenize", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404
