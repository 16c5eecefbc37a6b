"""Sampler fields as SillyTavern's text-completion types send them, on our routes."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.conftest import Api

# What SillyTavern sends to /v1/completions for its KoboldCpp, TabbyAPI and
# text-generation-webui types (defaults of its sampler panel), abridged.
SILLYTAVERN = {
    "prompt": "Hi",
    "model": "fake",
    "max_new_tokens": 40,
    "max_tokens": 40,
    "temperature": 0.7,
    "top_p": 0.9,
    "typical_p": 1,
    "typical": 1,
    "sampler_seed": -1,
    "min_p": 0,
    "repetition_penalty": 1.1,
    "rep_pen": 1.1,
    "rep_pen_range": 0,
    "repetition_penalty_range": 0,
    "top_k": 0,
    "min_length": 0,
    "min_tokens": 0,
    "add_bos_token": True,
    "smoothing_factor": 0,
    "smoothing_curve": 1,
    "dry_allowed_length": 2,
    "dry_multiplier": 0,
    "dry_base": 1.75,
    "dry_sequence_breakers": '["\\n", ":", "\\"", "*"]',
    "dry_penalty_last_n": 0,
    "stopping_strings": ["\nUser:"],
    "stop": ["\nUser:"],
    "truncation_length": 4096,
    "ban_eos_token": False,
    "skip_special_tokens": True,
    "top_a": 0,
    "tfs": 1,
    "mirostat_mode": 0,
    "mirostat_tau": 5,
    "mirostat_eta": 0.1,
    "custom_token_bans": "",
    "banned_strings": [],
    "api_type": "koboldcpp",
    "api_server": "http://127.0.0.1:5001",
    "sampler_order": [6, 0, 1, 3, 4, 2, 5],
    "xtc_threshold": 0.1,
    "xtc_probability": 0,
    "seed": -1,
    "guidance_scale": 1,
    "negative_prompt": "",
    "grammar_string": "",
    "repeat_penalty": 1.1,
    "tfs_z": 1,
    "repeat_last_n": 0,
    "n_predict": 40,
    "num_predict": 40,
    "num_ctx": 4096,
    "mirostat": 0,
    "ignore_eos": False,
    "rep_pen_slope": 1,
    "logit_bias": {},
}


def _complete(api: Api, body: dict[str, Any]) -> Any:
    r = api.client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r


def test_sillytavern_default_body_is_served(api: Api) -> None:
    r = _complete(api, SILLYTAVERN)
    req = api.engine.requests[-1]
    p = req.params
    assert req.max_tokens == 40 and p.seed is None
    assert p.repetition_penalty == pytest.approx(1.1) and p.penalty_last_n == 0
    assert p.dry_sequence_breakers == ("\n", ":", '"', "*")
    assert p.sampler_order == ("top_k", "top_a", "tfs", "typical_p", "top_p", "temperature")
    assert "\nUser:" in req.stop
    ignored = r.headers["x-hostler-ignored-params"].split(",")
    for name in ("negative_prompt", "api_server"):
        assert name in ignored
    for name in ("rep_pen", "sampler_seed", "n_predict", "stopping_strings", "typical", "tfs"):
        assert name not in ignored


@pytest.mark.parametrize(
    ("fields", "check"),
    [
        ({"samplers": ["top_k", "typ_p", "top_p", "min_p", "temperature"]}, "order"),
        ({"sampler_priority": ["temperature", "top_k", "min_p", "quadratic_sampling"]}, "prio"),
        ({"logit_bias": [[5, -1.5], [7, False]]}, "bias"),
        ({"custom_token_bans": "5, 7"}, "bans"),
        ({"json_schema": {"type": "integer"}}, "schema"),
        ({"grammar": 'root ::= "yes" | "no"'}, "grammar"),
    ],
)
def test_foreign_forms(api: Api, fields: dict[str, Any], check: str) -> None:
    _complete(api, {"model": "fake", "prompt": "Hi", **fields})
    p = api.engine.requests[-1].params
    if check == "order":
        assert p.sampler_order == ("top_k", "typical_p", "top_p", "min_p", "temperature")
    elif check == "prio":
        assert p.sampler_order == ("temperature", "top_k", "min_p", "smoothing")
    elif check == "bias":
        assert p.logit_bias == {5: -1.5, 7: float("-inf")}
    elif check == "bans":
        assert p.logit_bias == {5: float("-inf"), 7: float("-inf")}
    else:
        assert p.grammar and "root" in p.grammar


def test_our_names_win_and_our_order_stays_strict(api: Api) -> None:
    _complete(api, {"model": "fake", "prompt": "Hi", "rep_pen": 1.5, "repetition_penalty": 1.2})
    assert api.engine.requests[-1].params.repetition_penalty == pytest.approx(1.2)
    r = api.client.post(
        "/v1/completions",
        json={"model": "fake", "prompt": "Hi", "sampler_order": ["top_k", "penalties"]},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "sampler_order"


def test_bad_grammar_is_400_naming_grammar(api: Api) -> None:
    r = api.client.post(
        "/v1/completions", json={"model": "fake", "prompt": "Hi", "grammar": "nonsense ::="}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "grammar"
    deep = "root ::= " + "(" * 500 + '"a"' + ")" * 500
    r = api.client.post("/v1/completions", json={"model": "fake", "prompt": "Hi", "grammar": deep})
    assert r.status_code == 400 and r.json()["error"]["param"] == "grammar"


def test_json_object_with_a_schema_uses_the_schema(api: Api) -> None:
    from server.engine.grammar import JSON_OBJECT_GRAMMAR

    fmt = {"type": "json_object", "schema": {"type": "integer"}}
    _complete(api, {"model": "fake", "prompt": "Hi", "response_format": fmt})
    grammar = api.engine.requests[-1].params.grammar
    assert grammar and grammar != JSON_OBJECT_GRAMMAR and "root" in grammar
    r = api.client.post(
        "/v1/chat/completions",
        json={
            "model": "fake",
            "messages": [{"role": "user", "content": "x"}],
            "response_format": fmt,
        },
    )
    assert r.status_code == 200 and "x-hostler-ignored-params" not in r.headers


def test_fields_valid_for_one_shape_but_not_the_other_are_400(api: Api) -> None:
    # `echo` is unknown to chat (kept as an extra) but typed on text completions.
    body = {"model": "fake", "prompt": "Hi", "echo": "loud"}
    r = api.client.post("/api/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
    r = api.client.post("/completion", json={"prompt": "Hi", "suffix": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
