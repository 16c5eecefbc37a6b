"""A model's presets: defaults, named presets, forced and stripped fields, its ban list."""

from __future__ import annotations

import pytest

from tests.api.conftest import Api


def test_defaults_fill_what_the_request_leaves_unset(api: Api, stream: bool) -> None:
    r, _ = api.chat({"model": "other", "top_p": 0.5}, stream)
    assert r.status_code == 200
    p = api.engines["other"].requests[-1].params
    assert p.temperature == 0.5 and p.top_p == 0.5
    assert "x-hostler-ignored-params" not in r.headers


def test_a_named_preset_comes_before_defaults_and_after_the_request(api: Api, stream: bool) -> None:
    r, _ = api.chat({"model": "other", "preset": "creative", "min_p": 0.2}, stream)
    assert r.status_code == 200
    p = api.engines["other"].requests[-1].params
    assert p.temperature == 1.2 and p.min_p == 0.2 and p.top_p == 0.9


def test_an_unknown_preset_is_a_400_naming_the_choices(api: Api, stream: bool) -> None:
    r, body = api.chat({"model": "other", "preset": "nope"}, stream)
    assert r.status_code == 400
    assert body["error"]["param"] == "preset" and "creative" in body["error"]["message"]


def test_forced_values_win_and_are_reported_when_they_override(api: Api, stream: bool) -> None:
    r, _ = api.chat({"model": "other", "top_k": 5}, stream)
    assert api.engines["other"].requests[-1].params.top_k == 40
    assert "top_k" in r.headers["x-hostler-ignored-params"].split(",")
    r, _ = api.chat({"model": "other", "top_k": 40}, stream)
    assert "x-hostler-ignored-params" not in r.headers  # sent what is forced: applied


def test_stripped_fields_are_dropped_and_reported(api: Api, stream: bool) -> None:
    r, _ = api.chat({"model": "other", "repetition_penalty": 1.5}, stream)
    assert api.engines["other"].requests[-1].params.repetition_penalty == 1.0
    assert "repetition_penalty" in r.headers["x-hostler-ignored-params"].split(",")


def test_the_models_ban_list_joins_the_requests(api: Api, stream: bool) -> None:
    api.chat({"model": "other", "banned_strings": ["a testament to"]}, stream)
    bans = api.engines["other"].requests[-1].bans
    assert bans is not None and bans.size == 3
    api.chat({"model": "fake"}, stream)
    assert api.engine.requests[-1].bans is None


@pytest.mark.parametrize(
    ("bans", "why"),
    [
        ([{"regex": "("}], "not a valid regular expression"),
        ([{"regex": "a?"}], "matches the empty string"),
        ([{"text": "a", "regex": "b"}], "exactly one"),
        (["x" * 300], "at most 256 characters"),
        ([f"p{i}" for i in range(17_000)], "at most"),
    ],
)
def test_unusable_ban_lists_are_400_before_the_engine(
    api: Api, stream: bool, bans: list[object], why: str
) -> None:
    r, body = api.chat({"banned_strings": bans}, stream)
    assert r.status_code == 400, body
    assert body["error"]["param"].startswith("banned_strings")
    assert why in body["error"]["message"]
    assert not api.engine.requests


def test_sillytavern_and_kobold_ban_fields(api: Api) -> None:
    r, _ = api.chat({"banned_strings": ["Elara", {"regex": "\\bsmirk"}]}, False)
    assert r.status_code == 200
    assert api.engine.requests[-1].bans is not None
    r = api.client.post(
        "/api/v1/generate",
        json={"prompt": "Hi", "max_length": 8, "banned_tokens": ["shivers", "ozone"]},
    )
    assert r.status_code == 200
    bans = api.engine.requests[-1].bans
    assert bans is not None and bans.size == 2


def test_logit_bias_by_text_biases_each_spelling(api: Api) -> None:
    r, _ = api.chat({"logit_bias": {"Elara": -100, "12": 3}}, False)
    assert r.status_code == 200
    bias = api.engine.requests[-1].params.logit_bias
    spellings = api.engine.tokenize("Elara", add_special=False) + api.engine.tokenize(
        " Elara", add_special=False
    )
    assert all(bias[t] == float("-inf") for t in spellings if t != 12)
    assert bias[12] == 3
