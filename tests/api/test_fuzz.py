"""Fuzz tier: random and mutated bodies against the app (fake engine), bounded in count.

The fields come from our own OpenAPI document, so new request fields are fuzzed too.

Whatever a client sends, the answer is never a 5xx, and every error has our shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.api.guard import is_ollama
from tests.api.conftest import Api, make_api


def _request_fields(openapi: dict[str, Any]) -> list[str]:
    """Every field of the request bodies our OpenAPI document describes."""
    names: set[str] = set()
    for schema in openapi["components"]["schemas"].values():
        if schema.get("title") in ("ChatCompletionRequest", "CompletionRequest"):
            names |= set(schema.get("properties", {}))
    assert {"messages", "prompt", "temperature", "logit_bias"} <= names
    return sorted(names)


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "bogus"]), "content": values}
)


def _body(fields: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    base = {"model": "fake", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    mutated = st.dictionaries(st.sampled_from(fields), values, max_size=4).map(
        lambda extra: {**base, **extra}
    )
    with_messages = st.lists(message, min_size=0, max_size=3).map(
        lambda msgs: {**base, "messages": msgs}
    )
    return mutated | with_messages | st.dictionaries(st.text(max_size=10), values, max_size=5)


def _check(api: Api, path: str, body: Any) -> None:
    r = api.client.post(
        path, content=json.dumps(body), headers={"content-type": "application/json"}
    )
    assert r.status_code < 500, (path, body, r.text[:500])
    if r.status_code >= 400 and is_ollama(path):
        assert isinstance(r.json()["error"], str)  # Ollama's shape
    elif r.status_code >= 400:
        err = r.json()["error"]
        assert err["code"] == r.status_code and isinstance(err["message"], str)
    elif body.get("stream") is True and path.startswith("/v1/"):
        assert "data: [DONE]" in r.text


# Every route that takes a body, the foreign dialects' too.
PATHS = [
    "/v1/chat/completions", "/v1/completions", "/api/v1/chat/completions", "/completion",
    "/tokenize", "/detokenize", "/api/v1/generate", "/api/extra/generate/stream",
    "/api/extra/tokencount", "/api/chat", "/api/generate", "/api/show", "/v1/token/encode",
    "/v1/token/decode", "/v1/internal/encode", "/v1/internal/token-count",
    "/v1/embeddings", "/embedding", "/api/embed", "/api/embeddings", "/api/extra/embeddings",
    "/v1/rerank",
]  # fmt: skip


def test_fuzz_bodies(tmp_path: Path) -> None:
    apis = make_api(tmp_path)
    api = next(apis)
    fields = _request_fields(api.client.get("/openapi.json").json())

    @settings(
        max_examples=300,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(body=_body(fields), path=st.sampled_from(PATHS))
    def run(body: dict[str, Any], path: str) -> None:
        if path == "/v1/completions" and "prompt" not in body:
            body = {**body, "prompt": "Hi"}
        _check(api, path, body)

    try:
        run()
    finally:
        next(apis, None)


def test_raw_bytes_bodies(api: Api) -> None:
    for raw in (b"", b"[]", b"null", b"{", b"\xff\xfe", b'{"messages": "x"}', b"1e999"):
        r = api.client.post(
            "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
        )
        assert 400 <= r.status_code < 500, raw
        assert r.json()["error"]["code"] == r.status_code
