"""What a hostile or sloppy client can send: each is a clean 4xx, never a 5xx or a hang."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from server.templates import render
from tests.api.conftest import Api, make_api


def _error(body: dict[str, Any], status: int, r_status: int, param: str | None = None) -> None:
    assert r_status == status, body
    err = body["error"]
    assert err["code"] == status and err["type"] and err["message"]
    if param is not None:
        assert err["param"] == param


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"dry_multiplier": 1, "dry_penalty_last_n": 2_000_000_000}, "dry_penalty_last_n"),
        ({"repetition_penalty_range": 50_000_000}, "repetition_penalty_range"),
        ({"logit_bias": {"x" * 200: 1}}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(2000)}}, "logit_bias"),
        ({"stop": ["x" * 5000]}, "stop"),
        ({"dry_sequence_breakers": ["a"] * 1000}, "dry_sequence_breakers"),
        ({"top_k": 2**40}, "top_k"),
        ({"n": 10_000}, "n"),
    ],
)
def test_unbounded_values_are_400(
    api: Api, stream: bool, fields: dict[str, Any], param: str
) -> None:
    r, body = api.chat(fields, stream)
    _error(body, 400, r.status_code, param)
    assert not api.engine.requests  # refused before anything reached the engine


def test_whole_context_windows(api: Api) -> None:
    n_ctx = api.engine.info.n_ctx
    for window in (-1, 8192):  # 8192: a frontend's slider on a smaller model
        r, _ = api.chat({"repetition_penalty_range": window, "dry_penalty_last_n": window}, False)
        assert r.status_code == 200
        p = api.engine.requests[-1].params
        assert p.penalty_last_n == p.dry_penalty_last_n == n_ctx


def test_infinity_is_rejected(api: Api) -> None:
    raw = '{"model": "fake", "messages": [{"role": "user", "content": "x"}], "dry_base": Infinity}'
    r = api.client.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    _error(r.json(), 400, r.status_code)


def test_odd_field_names_are_reported_header_safe(api: Api) -> None:
    r, _ = api.chat({"😀": 1, "a\r\nb": 2, "x" * 500: 3}, False)
    assert r.status_code == 200
    header = r.headers["x-hostler-ignored-params"]
    assert header.isascii() and "\r" not in header and "\n" not in header
    assert "%F0%9F%98%80" in header and "a%0D%0Ab" in header
    assert len(header) < 1000


def test_empty_prompt_starts_from_bos(api: Api) -> None:
    r = api.client.post("/v1/completions", json={"model": "fake", "prompt": "", "max_tokens": 3})
    assert r.status_code == 200
    assert api.engine.requests[-1].prompt_tokens == [0]


def test_body_limit_is_413_before_parsing(tmp_path: Path) -> None:
    for api in make_api(tmp_path, max_body_mb=0.01):
        big = {"model": "fake", "messages": [{"role": "user", "content": "x" * 20_000}]}
        r = api.client.post("/v1/chat/completions", json=big)
        _error(r.json(), 413, r.status_code)

        def chunks() -> Any:
            yield b'{"model": "fake", "messages": [{"role": "user", "content": "'
            for _ in range(100):
                yield b"x" * 1000
            yield b'"}]}'

        r = api.client.post(
            "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        _error(r.json(), 413, r.status_code)
        assert not api.engine.requests


def test_host_allowlist_blocks_dns_rebinding(api: Api) -> None:
    r = api.client.get("/v1/models", headers={"host": "attacker.example:8000"})
    _error(r.json(), 400, r.status_code, "Host")
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert api.client.get("/v1/models", headers={"host": host}).status_code == 200


def test_configured_hosts(tmp_path: Path) -> None:
    for api in make_api(tmp_path, allowed_hosts=["gpu-box.lan"]):
        assert api.client.get("/health", headers={"host": "gpu-box.lan:8000"}).status_code == 200
        assert api.client.get("/health", headers={"host": "localhost"}).status_code == 400


def test_cross_site_origins_are_refused_by_default(api: Api) -> None:
    r = api.client.post(
        "/v1/chat/completions",
        json={"model": "fake", "messages": [{"role": "user", "content": "x"}]},
        headers={"origin": "https://evil.example"},
    )
    _error(r.json(), 403, r.status_code, "Origin")
    assert "access-control-allow-origin" not in r.headers
    same = api.client.get("/v1/models", headers={"origin": "http://localhost"})
    assert same.status_code == 200


def test_configured_cors_origin(tmp_path: Path) -> None:
    for api in make_api(tmp_path, cors_origins=["http://localhost:3000"]):
        r = api.client.options(
            "/v1/chat/completions",
            headers={
                "origin": "http://localhost:3000",
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization,content-type",
            },
        )
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = api.client.get("/v1/models", headers={"origin": "https://evil.example"})
        assert r.status_code == 403


KEYS = [
    {"name": "alice", "key": "alice-secret-1", "requests_per_minute": 2},
    {"name": "bob", "key": "bob-secret-123", "tokens_per_day": 50},
]


def test_every_route_but_health_needs_the_key(tmp_path: Path) -> None:
    for api in make_api(tmp_path, api_key="sekret-key"):
        for path in ("/v1/models", "/openapi.json", "/docs", "/metrics", "/api/v1/auth/key"):
            assert api.client.get(path).status_code == 401, path
            ok = api.client.get(path, headers={"Authorization": "Bearer sekret-key"})
            assert ok.status_code == 200, path
        assert api.client.get("/health").status_code == 200


def test_named_keys_with_rate_and_token_quotas(tmp_path: Path) -> None:
    for api in make_api(tmp_path, keys=KEYS):
        alice = {"Authorization": "Bearer alice-secret-1"}
        bob = {"Authorization": "Bearer bob-secret-123"}
        assert api.chat({}, False, headers=alice)[0].status_code == 200
        assert api.chat({}, True, headers=alice)[0].status_code == 200
        r, body = api.chat({}, False, headers=alice)
        _error(body, 429, r.status_code)
        assert body["error"]["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1
        info = api.client.get("/api/v1/auth/key", headers=alice).json()["data"]
        assert info["label"] == "alice" and info["rate_limit"]["requests"] == 2

        r, _ = api.chat({}, False, headers=bob)  # one reply uses more than 50 tokens
        assert r.status_code == 200
        info = api.client.get("/api/v1/auth/key", headers=bob).json()["data"]
        assert info["usage"] > 50 and info["limit"] == 50 and info["limit_remaining"] == 0
        r, body = api.chat({}, True, headers=bob)
        _error(body, 429, r.status_code)
        assert int(r.headers["retry-after"]) > 3600
        assert (
            api.chat({}, False, headers={"Authorization": "Bearer nope-nope"})[0].status_code == 401
        )


def test_metrics(api: Api) -> None:
    api.chat({}, False)
    api.chat({}, True)
    text = api.client.get("/metrics").text
    assert 'hostler_requests_total{route="/v1/chat/completions",status="200"} 2.0' in text
    assert 'hostler_tokens_total{kind="completion"}' in text
    assert "hostler_time_to_first_token_seconds_count 2.0" in text
    assert 'hostler_slots_busy{model="fake"} 0.0' in text
    assert "hostler_model_loads_total 1.0" in text


def test_absent_model_does_not_evict_the_working_one(tmp_path: Path) -> None:
    for api in make_api(tmp_path, max_models=1):
        engine = api.engine
        r, body = api.chat({"model": "absent"}, False)
        _error(body, 404, r.status_code, "model")
        assert api.engines["fake"] is engine and not engine.closed
        r, body = api.chat({"model": "broken"}, False)
        assert r.status_code == 503
        assert api.chat({}, False)[0].status_code == 200  # reloaded after the failed load
        assert api.client.get("/health").status_code == 200


@pytest.mark.parametrize(
    "template",
    [
        "{% for i in range(10**9) %}x{% endfor %}",
        "{{ 'a' * 1000000000 }}",
        "{{ 'a'.ljust(1000000000) }}",
        "{{ 'a'|center(1000000000) }}",
        "{{ '%01000000000d' % 1 }}",
        "{{ '{:>1000000000}'.format(1) }}",
        "{% set ns = namespace(x='ab') %}{% for i in range(40) %}"
        "{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x }}",
        "{% set ns = namespace(x=[1]) %}{% for i in range(40) %}"
        "{% set ns.x = ns.x + ns.x %}{% endfor %}{{ ns.x|length }}",
        "{{ 2 ** 1000000000 }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ raise_exception('no') }}",
        "{{ 1 / 0 }}",
    ],
)
def test_hostile_templates_are_400(api: Api, template: str) -> None:
    from server.templates.render import ChatTemplate

    api.models._templates[("fake", "hostile")] = ChatTemplate("hostile", template)
    r, body = api.chat({"template": "hostile"}, False)
    _error(body, 400, r.status_code, "messages")
    assert not api.engine.requests


def test_slow_template_is_stopped(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.templates.render import ChatTemplate

    monkeypatch.setattr(render, "MAX_RENDER_SECONDS", 0.5)
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    api.models._templates[("fake", "slow")] = ChatTemplate("slow", slow)
    start = time.monotonic()
    r, body = api.chat({"template": "slow"}, False)
    _error(body, 400, r.status_code, "messages")
    assert time.monotonic() - start < 5
    assert api.client.get("/health").status_code == 200


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "maxLength": 100000},
        {"type": "string", "pattern": "^a{0,100000}$"},
        {"type": "string", "maxLength": 3000},
    ],
)
def test_grammar_bombs_are_400_before_the_stream(api: Api, stream: bool, schema: Any) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    r, body = api.chat({"response_format": fmt}, stream)
    _error(body, 400, r.status_code, "response_format")


def test_huge_prompts_are_never_tokenized_whole(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    longest: list[int] = [0]
    real = api.engine.tokenize

    def tokenize(text: str, *, add_special: bool) -> list[int]:
        longest[0] = max(longest[0], len(text))
        return real(text, add_special=add_special)

    monkeypatch.setattr(api.engine, "tokenize", tokenize)
    limit = api.engine.info.n_ctx * api.engine.info.max_token_bytes
    huge = "word " * 200_000  # 1 MB, against a 256-token context
    r, body = api.chat({"messages": [{"role": "user", "content": huge}], "transforms": []}, False)
    _error(body, 400, r.status_code, "messages")
    msgs = [
        {"role": "system", "content": "card"},
        *({"role": "user", "content": huge[:50_000] + str(i)} for i in range(20)),
        {"role": "user", "content": "last"},
    ]
    r, _ = api.chat({"messages": msgs, "max_tokens": 8}, False)
    assert r.status_code == 200
    r = api.client.post("/v1/completions", json={"model": "fake", "prompt": huge, "max_tokens": 8})
    assert r.status_code == 200
    r = api.client.post(
        "/v1/completions",
        json={"model": "fake", "prompt": huge, "max_tokens": 8, "transforms": []},
    )
    _error(r.json(), 400, r.status_code, "prompt")
    assert 0 < longest[0] <= 2 * limit


def test_prompt_batches_are_bounded(api: Api) -> None:
    body = {"model": "fake", "prompt": ["x"] * 65, "max_tokens": 2}
    r = api.client.post("/v1/completions", json=body)
    _error(r.json(), 400, r.status_code, "prompt")
    assert not api.engine.requests


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"banned_strings": ["x"] * 20_000}, "banned_strings"),
        ({"banned_strings": ["x" * 5_000]}, "banned_strings"),
        ({"banned_strings": [{"regex": "(" * 400 + ")" * 400}]}, "banned_strings"),
        ({"banned_strings": [{"text": ""}]}, "banned_strings"),
        ({"banned_strings": "not a list"}, "banned_strings"),
        ({"logit_bias": {"": 1}}, "logit_bias"),
        ({"keep_alive": "nan"}, "keep_alive"),
        ({"keep_alive": "1" * 10_000}, "keep_alive"),
        ({"preset": "p" * 10_000}, "preset"),
        ({"tfs": 0}, "tfs"),
        ({"smoothing_curve": 1e9}, "smoothing_curve"),
        ({"adaptive_decay": 5}, "adaptive_decay"),
    ],
)
def test_hostile_values_of_the_role_play_fields_are_400(
    api: Api, stream: bool, fields: dict[str, Any], param: str
) -> None:
    r, body = api.chat(fields, stream)
    _error(body, 400, r.status_code)
    assert body["error"]["param"].startswith(param)
    assert not api.engine.requests  # refused before anything reached the engine


def test_odd_unicode_in_ban_lists_and_bias_keys_is_served(api: Api, stream: bool) -> None:
    # A huge counted repeat is fine: each search sees 512 characters, under a timeout.
    fields = {
        "banned_strings": [
            "😀\u0301",
            "\u0130stanbul",
            "\x00",
            {"regex": "\\p{Han}+"},
            {"regex": "a{0,100000}b"},
        ],
        "logit_bias": {"😀": -5, "\u202e": 2},
    }
    r, _ = api.chat(fields, stream)
    assert r.status_code == 200
