"""Embeddings and rerank on every frontend's route, with fake engines: shapes, model
choice, order, encodings, truncation and every bad input (in each dialect's error shape)."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from openai import BadRequestError, OpenAI

from server.api import create_app
from server.config import load_settings
from tests.api.conftest import wait_until_loaded
from tests.api.fake_engine import FakeEmbedder, FakeEngine

MODELS = """
models:
  chat:
    source: {type: path, path: chat.gguf}
  embed:
    source: {type: path, path: embed.gguf}
    embedding: true
    aliases: [nomic-embed-text]
    matryoshka: true
  ranker:
    source: {type: path, path: ranker.gguf}
    embedding: true
    pooling: rank
"""


class EmbedApi:
    def __init__(self, client: TestClient, engines: dict[str, Any]) -> None:
        self.client = client
        self.engines = engines

    def post(self, path: str, body: Any) -> httpx.Response:
        return self.client.post(path, json=body)

    def vectors(self, body: dict[str, Any], path: str = "/v1/embeddings") -> list[list[float]]:
        r = self.post(path, body)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        return [d["embedding"] for d in sorted(data, key=lambda d: d["index"])]


@contextmanager
def _app(tmp_path: Path, yaml: str = MODELS, **settings: Any) -> Iterator[EmbedApi]:
    f = tmp_path / "models.yaml"
    f.write_text(yaml)
    s, models = load_settings({"models_file": f, "model": "chat", **settings})
    engines: dict[str, Any] = {}

    def loader(model_id: str) -> Any:
        engine: Any = FakeEngine()
        if model_id == "ranker":
            engine = FakeEmbedder(pooling="rank")
        elif model_id != "chat":
            engine = FakeEmbedder()
        engines[model_id] = engine
        return engine

    app = create_app(s, models, loader=loader, check=lambda _m: None)
    with TestClient(app, base_url="http://localhost") as client:
        wait_until_loaded(client)
        yield EmbedApi(client, engines)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[EmbedApi]:
    # Downloaded (the default embedding model is the first downloaded one).
    for name in ("chat", "embed", "ranker"):
        (tmp_path / f"{name}.gguf").write_bytes(b"GGUF")
    with _app(tmp_path) as api:
        yield api


def _expected(text: str) -> np.ndarray:
    v = np.zeros(16)
    for c in text.lower():
        if "a" <= c <= "p":
            v[ord(c) - ord("a")] += 1
    v[15] += 0.5
    return v / np.linalg.norm(v)


def test_openai_sdk_base64_and_floats(api: EmbedApi) -> None:
    http = api.client
    sdk = OpenAI(base_url="http://localhost/v1", api_key="x", http_client=http)
    texts = ["a cat", "a dog", "the mat"]
    out = sdk.embeddings.create(model="embed", input=texts)  # the SDK asks for base64
    assert [d.index for d in out.data] == [0, 1, 2] and out.model == "embed"
    for d, text in zip(out.data, texts, strict=True):
        assert np.allclose(d.embedding, _expected(text), atol=1e-6)
    assert out.usage.prompt_tokens == sum(len(t) for t in texts)
    floats = sdk.embeddings.create(model="embed", input=texts, encoding_format="float")
    as_f32 = [np.array(d.embedding, dtype=np.float32) for d in floats.data]
    for a, d in zip(as_f32, out.data, strict=True):  # the same float32 numbers either way
        assert np.array_equal(a, np.array(d.embedding, dtype=np.float32))
    raw = api.post("/v1/embeddings", {"input": "a cat", "encoding_format": "base64"}).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    assert np.allclose(struct.unpack(f"<{len(packed) // 4}f", packed), _expected("a cat"))


def test_order_and_one_alone_equals_in_batch(api: EmbedApi) -> None:
    texts = [f"text {c * 3}" for c in "abcdefgh"]
    batch = api.vectors({"input": texts})
    for i, text in enumerate(texts):
        assert api.vectors({"input": text})[0] == batch[i]
    for v in batch:
        assert abs(np.linalg.norm(v) - 1) < 1e-5  # normalised: RisuAI ranks by dot product


def test_model_choice(api: EmbedApi) -> None:
    # SillyTavern's llama.cpp source sends no model; Open WebUI may send the chat model's.
    r = api.post("/v1/embeddings", {"input": "x"})
    assert r.status_code == 200 and r.json()["model"] == "embed"
    assert "x-hostler-ignored-params" not in r.headers
    r = api.post("/v1/embeddings", {"input": "x", "model": "chat"})
    assert r.json()["model"] == "embed" and r.headers["x-hostler-ignored-params"] == "model"
    r = api.post("/api/embed", {"input": "x", "model": "nomic-embed-text:latest"})
    assert r.status_code == 200 and "x-hostler-ignored-params" not in r.headers
    # Both stay loaded with max_models 1: embedding models are not counted.
    loaded = {m["model"]: m["kind"] for m in api.client.get("/v1/ps").json()["models"]}
    assert loaded == {"chat": "chat", "embed": "embedding"}
    # An embedding model cannot chat, and a reranker makes no vectors.
    body = {"model": "embed", "messages": [{"role": "user", "content": "hi"}]}
    r = api.post("/v1/chat/completions", body)
    assert r.status_code == 400 and "embedding model" in r.json()["error"]["message"]
    r = api.post("/v1/embeddings", {"input": "x", "model": "ranker"})
    assert r.status_code == 400 and "/v1/rerank" in r.json()["error"]["message"]


def test_models_list_marks_kinds(api: EmbedApi) -> None:
    cards = api.client.get("/v1/models").json()["data"]
    kinds = {c["id"]: c["hostler"]["kind"] for c in cards}
    assert kinds == {"chat": "chat", "embed": "embedding", "ranker": "rerank"}
    assert cards[0]["id"] == "chat"  # chat first: SillyTavern takes the first id
    embed = next(c for c in cards if c["id"] == "embed")
    assert embed["architecture"]["output_modalities"] == ["embeddings"]
    assert "dimensions" in embed["supported_parameters"]


def test_dimensions(api: EmbedApi) -> None:
    v = api.vectors({"input": "abc", "dimensions": 4})[0]
    assert len(v) == 4 and abs(np.linalg.norm(v) - 1) < 1e-5
    full = api.vectors({"input": "abc", "dimensions": 16})[0]
    assert np.allclose(full, _expected("abc"))
    r = api.post("/v1/embeddings", {"input": "abc", "dimensions": 17})
    assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"


def test_dialect_shapes(api: EmbedApi) -> None:
    # Ollama's /api/embed (Open WebUI) and legacy /api/embeddings (SillyTavern).
    r = api.post("/api/embed", {"model": "embed", "input": ["a cat", "a dog"]}).json()
    assert r["model"] == "embed" and len(r["embeddings"]) == 2
    assert np.allclose(r["embeddings"][1], _expected("a dog")) and r["prompt_eval_count"] == 10
    r = api.post("/api/embeddings", {"model": "embed", "prompt": "a cat", "keep_alive": -1})
    assert np.allclose(r.json()["embedding"], _expected("a cat"))
    assert api.post("/api/embeddings", {"model": "embed", "prompt": ""}).json() == {"embedding": []}
    assert api.post("/api/embed", {"model": "embed"}).json()["embeddings"] == []
    # KoboldCpp's (OpenAI's shape, truncate on by default).
    r = api.post("/api/extra/embeddings", {"input": "a cat" * 40}).json()
    assert r["object"] == "list" and r["usage"]["prompt_tokens"] == 64
    # llama-server's native /embedding and /embeddings: a list of {index, embedding: [v]}.
    for path in ("/embedding", "/embeddings"):
        r = api.post(path, {"content": ["a cat", "a dog"]}).json()
        assert [x["index"] for x in r] == [0, 1] and len(r[0]["embedding"]) == 1
        assert np.allclose(r[1]["embedding"][0], _expected("a dog"))
    # Token ids, one list or several.
    ids = [ord(c) for c in "a cat"]
    assert np.allclose(api.vectors({"input": ids})[0], _expected("a cat"))
    assert len(api.vectors({"input": [ids, ids]})) == 2


def test_long_inputs(api: EmbedApi) -> None:
    long = "a" * 100  # the fake model reads 64 tokens
    r = api.post("/v1/embeddings", {"input": ["short", long]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[1]"
    assert "truncate" in r.json()["error"]["message"]
    assert len(api.vectors({"input": [long], "truncate": True})) == 1
    assert api.engines["embed"].batches[-1] == [[ord("a")] * 64]
    r = api.post("/api/embed", {"input": long, "truncate": False})
    assert r.status_code == 400 and "input" in r.json()["error"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"input": []},
        {"input": None},
        {"input": [""]},
        {"input": ""},
        {"input": {"text": "x"}},
        {"input": [1, "a"]},
        {"input": [["a"]]},
        {"input": [[]]},
        {"input": [-1]},
        {"input": [True]},
        {"input": [[1, 2], [1.5]]},
        {"input": [[[1]]]},
        {"input": ["x"] * 2049},
        {"input": [[5000]]},
        {"input": "x", "encoding_format": "int8"},
        {"input": "x", "dimensions": 0},
        {"input": "x", "truncate": "maybe"},
    ],
)
def test_bad_inputs_are_400s(api: EmbedApi, body: dict[str, Any]) -> None:
    for path in ("/v1/embeddings", "/api/extra/embeddings"):
        r = api.post(path, body)
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert not api.engines.get("embed") or all(
        all(t for t in b) for b in api.engines["embed"].batches
    )


@pytest.mark.parametrize(
    "body", [{"input": [3]}, {"input": {"a": 1}}, {"input": [""]}, {"input": ["x"] * 2049}]
)
def test_ollama_errors_are_ollamas_shape(api: EmbedApi, body: dict[str, Any]) -> None:
    r = api.post("/api/embed", body)
    assert r.status_code == 400 and isinstance(r.json()["error"], str)


def test_garbage_bodies(api: EmbedApi) -> None:
    for path in ("/v1/embeddings", "/embedding", "/api/embed", "/api/embeddings", "/v1/rerank"):
        r = api.client.post(
            path, content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400, path
        r = api.client.post(path, json=[1, 2, 3])
        assert r.status_code == 400, path


def test_rerank_with_embeddings(tmp_path: Path) -> None:
    (tmp_path / "embed.gguf").write_bytes(b"GGUF")  # no reranker downloaded: cosine
    docs = ["ddd", "abc", "aab", "abcd"]
    with _app(tmp_path) as api:
        r = api.post("/v1/rerank", {"query": "abc", "documents": docs, "top_n": 3})
    results = r.json()["results"]
    assert [x["index"] for x in results] == [1, 3, 2]
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert abs(scores[0] - 1) < 1e-5 and r.json()["model"] == "embed"


def test_rerank_with_a_reranker(api: EmbedApi) -> None:
    docs = ["the dog barks loudly", "stocks fell", "a dog and a cat"]
    body = {"model": "x", "query": "why does the dog bark", "documents": docs}
    r = api.post("/v1/rerank", {**body, "return_documents": True}).json()
    assert r["model"] == "ranker" and [x["index"] for x in r["results"]] == [0, 2, 1]
    top = r["results"][0]
    assert top["document"] == {"text": docs[0]} and abs(top["relevance_score"] - 0.7311) < 1e-3
    assert all(0 < x["relevance_score"] < 1 for x in r["results"])  # sigmoid of the logit
    # llama-server's paths, Cohere's object documents and TEI's `texts`.
    for path in ("/rerank", "/reranking", "/v1/reranking"):
        assert api.post(path, body).status_code == 200
    objs = {**body, "documents": [{"text": d} for d in docs], "top_n": 1}
    assert [x["index"] for x in api.post("/v1/rerank", objs).json()["results"]] == [0]
    tei = api.post("/rerank", {"query": body["query"], "texts": docs, "return_text": True})
    assert tei.json()[0] == {"index": 0, "score": pytest.approx(0.7311, abs=1e-3), "text": docs[0]}


@pytest.mark.parametrize(
    "body",
    [
        {"documents": ["a"]},
        {"query": "", "documents": ["a"]},
        {"query": "q"},
        {"query": "q", "documents": []},
        {"query": "q", "documents": [1]},
        {"query": "q", "documents": [{"title": "no text"}]},
        {"query": "q", "documents": ["a"], "top_n": 0},
        {"query": "q", "documents": ["a"] * 2049},
        {"query": ["q"], "documents": ["a"]},
    ],
)
def test_bad_rerank_bodies(api: EmbedApi, body: dict[str, Any]) -> None:
    r = api.post("/v1/rerank", body)
    assert r.status_code == 400, r.text


def test_no_embedding_model(tmp_path: Path) -> None:
    (tmp_path / "chat.gguf").write_bytes(b"GGUF")
    yaml = "models:\n  chat:\n    source: {type: path, path: chat.gguf}\n"
    with _app(tmp_path, yaml) as api:
        r = api.post("/v1/embeddings", {"input": "x"})
        assert r.status_code == 400 and "embedding: true" in r.json()["error"]["message"]
        r = api.post("/api/embeddings", {"model": "chat", "prompt": "x"})
    assert r.status_code == 400 and "--embedding-model" in r.json()["error"]


def test_embedding_model_setting(tmp_path: Path) -> None:
    yaml = MODELS + "  other:\n    source: {type: path, path: o.gguf}\n    embedding: true\n"
    with _app(tmp_path, yaml, embedding_model="other") as api:
        assert api.post("/v1/embeddings", {"input": "x"}).json()["model"] == "other"


def test_openai_sdk_error(api: EmbedApi) -> None:
    sdk = OpenAI(base_url="http://localhost/v1", api_key="x", http_client=api.client)
    with pytest.raises(BadRequestError, match="input"):
        sdk.embeddings.create(model="embed", input=[])


def test_metrics_and_health(api: EmbedApi) -> None:
    api.post("/v1/embeddings", {"input": ["a", "b"]})
    health = api.client.get("/health").json()
    assert "embed" in str(health)
    api.engines["embed"].health = lambda: {  # type: ignore[method-assign]
        "status": "ok", "slots": 64, "slots_busy": 0, "queued": 0, "pooling": "mean",
        "inputs": 2, "tokens": 2, "batches": 1,
    }  # fmt: skip
    text = api.client.get("/metrics").text
    assert 'hostler_embedding_inputs_total{model="embed"} 2.0' in text
