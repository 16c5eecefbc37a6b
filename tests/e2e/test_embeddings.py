"""Embeddings on the real engine: SmolLM2 as a mean-pooled embedding model
(`smollm2-135m-embed`) loaded beside the chat model, through the openai SDK and raw
bodies of each frontend's shape."""

from __future__ import annotations

import base64
import threading
import time
from typing import Any

import httpx
import numpy as np
from openai import OpenAI

MODEL = "smollm2-135m-embed"
CHUNK = (
    "Seraphina walked along the riverbank at dusk, the lantern swinging from her hand. "
    "The ferryman had not come back, and the village dogs were quiet. "
)


def _post(url: str, path: str, body: Any) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=300)


def _cos(a: Any, b: Any) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def test_openai_sdk(client: OpenAI) -> None:
    texts = ["The cat sat on the mat.", "A dog barked at the mailman.", "Quarks carry colour."]
    out = client.embeddings.create(model=MODEL, input=texts)  # base64, decoded by the SDK
    assert out.model == MODEL and [d.index for d in out.data] == [0, 1, 2]
    assert out.usage.prompt_tokens > 10
    for d in out.data:
        assert len(d.embedding) == 576 and abs(np.linalg.norm(d.embedding) - 1) < 1e-4
    floats = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    for a, b in zip(floats.data, out.data, strict=True):  # base64 decodes to the floats
        assert np.array_equal(np.float32(a.embedding), np.float32(b.embedding))
    alone = client.embeddings.create(model=MODEL, input=texts[1], encoding_format="float")
    assert _cos(alone.data[0].embedding, floats.data[1].embedding) > 0.999
    # Similar texts are closer than unrelated ones.
    v = [np.asarray(d.embedding) for d in floats.data]
    assert v[0] @ v[1] > v[0] @ v[2]


def test_frontend_shapes(server_url: str) -> None:
    # SillyTavern's llama.cpp source: no model, up to 10 inputs, data sorted by index.
    texts = [f"Message {i}: {CHUNK[: 40 + 9 * i]}" for i in range(10)]
    r = _post(server_url, "/v1/embeddings", {"input": texts})
    assert r.status_code == 200 and r.json()["model"] == MODEL
    data = sorted(r.json()["data"], key=lambda d: d["index"])
    assert len(data) == 10
    ollama = _post(server_url, "/api/embed", {"model": MODEL, "input": texts[:2]}).json()
    assert _cos(ollama["embeddings"][1], data[1]["embedding"]) > 0.999
    legacy = _post(server_url, "/api/embeddings", {"model": MODEL, "prompt": texts[3]}).json()
    assert _cos(legacy["embedding"], data[3]["embedding"]) > 0.999
    kobold = _post(server_url, "/api/extra/embeddings", {"input": texts[4]}).json()
    assert _cos(kobold["data"][0]["embedding"], data[4]["embedding"]) > 0.999
    native = _post(server_url, "/embedding", {"content": texts[5]}).json()
    assert _cos(native[0]["embedding"][0], data[5]["embedding"]) > 0.999


def test_long_chunks(server_url: str) -> None:
    # A Data Bank chunk of 5,000 characters (~1.2k tokens): llama-server's default refuses it.
    chunk = (CHUNK * 40)[:5000]
    r = _post(server_url, "/v1/embeddings", {"model": MODEL, "input": chunk})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 1000
    # Beyond the model's context (2,048): a 400 naming the input, or cut with truncate.
    too_long = CHUNK * 70
    r = _post(server_url, "/v1/embeddings", {"model": MODEL, "input": ["hi", too_long]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[1]"
    r = _post(server_url, "/v1/embeddings", {"model": MODEL, "input": too_long, "truncate": True})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 2048


def test_rerank(server_url: str) -> None:
    docs = [
        "The stock market fell sharply on Tuesday.",
        "Dogs bark at strangers who come near the house.",
        "The recipe needs two cups of flour.",
    ]
    body = {"query": "Why do dogs bark at strangers?", "documents": docs, "top_n": 2}
    r = _post(server_url, "/v1/rerank", body).json()
    assert r["results"][0]["index"] == 1 and len(r["results"]) == 2
    assert all(0 <= x["relevance_score"] <= 1 for x in r["results"])


def test_embeddings_and_chat_share_the_server(client: OpenAI, server_url: str) -> None:
    """A chat stream keeps streaming while an embedding batch runs, and both finish."""
    chunk_times: list[float] = []
    span: dict[str, float] = {}
    errors: list[BaseException] = []

    def chat() -> None:
        try:
            stream = client.chat.completions.create(
                model="smollm2-135m",
                messages=[{"role": "user", "content": "Tell me a long story about a ferry."}],
                max_tokens=48,
                temperature=0,
                stream=True,
            )
            for c in stream:
                if c.choices and c.choices[0].delta.content:
                    chunk_times.append(time.monotonic())
        except BaseException as exc:
            errors.append(exc)

    def embed() -> None:
        try:
            span["start"] = time.monotonic()
            inputs = [f"{i}: {CHUNK * 3}"[:400] for i in range(24)]
            r = _post(server_url, "/v1/embeddings", {"model": MODEL, "input": inputs})
            span["end"] = time.monotonic()
            assert r.status_code == 200 and len(r.json()["data"]) == 24
        except BaseException as exc:
            errors.append(exc)

    _post(server_url, "/v1/embeddings", {"model": MODEL, "input": "warm up"})
    threads = [threading.Thread(target=embed), threading.Thread(target=chat)]
    for t in threads:
        t.start()
        time.sleep(0.3)  # the embedding batch is under way when the chat starts
    for t in threads:
        t.join(timeout=280)
    assert not errors, errors
    assert len(chunk_times) > 10
    during = [t for t in chunk_times if span["start"] <= t <= span["end"]]
    assert during, "the chat stalled behind the embeddings"
    health = httpx.get(server_url + "/health", timeout=10).json()
    assert MODEL in str(health)


def test_bad_input_on_the_real_server(server_url: str) -> None:
    for body in ({"input": []}, {"input": [""]}, {"input": [[10**9]]}, {"input": [1.5]}):
        r = _post(server_url, "/v1/embeddings", {"model": MODEL, **body})
        assert r.status_code == 400, (body, r.text)
    r = _post(server_url, "/api/embed", {"model": MODEL, "input": {"x": 1}})
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    encoded = base64.b64encode(b"x").decode()
    r = _post(server_url, "/v1/embeddings", {"model": MODEL, "input": encoded, "dimensions": 8})
    assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"
