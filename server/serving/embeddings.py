"""The embeddings and rerank use cases: texts (or token ids) -> vectors or scores.

Every route of every dialect comes here: the model is resolved (a request naming no
model, or a chat model, gets the default embedding model), inputs are tokenized and
checked against the model's context (cut when `truncate`, else a 400 naming the input)
before the engine sees them, and the engine packs them with other requests' inputs.

Rerank uses a reranker GGUF (rank pooling) where there is one: its logit for each
(query, document) pair, through a sigmoid to 0..1. Otherwise it embeds the query and
the documents and scores each by cosine similarity, clamped to 0..1 (a threshold such as
Open WebUI's then means what it means for cosine).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import numpy.typing as npt

from server.engine.types import Embedder
from server.errors import BadRequestError
from server.protocol.embeddings import EmbeddingInput
from server.registry import ModelSpec
from server.serving.job import Caller
from server.serving.models import ModelService
from server.serving.params import header_safe

Vector = npt.NDArray[np.float32]

# Inputs with more characters than this are tokenized off the event loop.
_INLINE_CHARS = 1 << 16


@dataclass
class Embeddings:
    """Vectors for a request's inputs, in input order."""

    model: str
    vectors: list[Vector]
    tokens: int
    seconds: float
    load_seconds: float = 0.0
    ignored: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Ranked:
    index: int
    score: float
    document: str


@dataclass
class Ranking:
    """Documents by relevance, best first (at most top_n of them)."""

    model: str
    results: list[Ranked]
    tokens: int
    ignored: list[str] = field(default_factory=list)


class EmbeddingService:
    def __init__(self, models: ModelService) -> None:
        self.models = models

    async def _engine(self, spec: ModelSpec) -> tuple[Embedder, float]:
        loaded = self.models.pool.is_loaded(spec.id)
        started = time.monotonic()
        engine = cast(Embedder, await self.models.engine(spec))
        return engine, 0.0 if loaded else time.monotonic() - started

    def _model(self, name: str | None, rerank: bool, ignored: list[str]) -> ModelSpec:
        spec = self.models.resolve_embedding(name, rerank=rerank)
        if (
            name
            and name not in (spec.id, *spec.aliases)
            and name.removesuffix(":latest")
            not in (
                spec.id,
                *spec.aliases,
            )
        ):
            ignored.append("model")  # a chat model's (or unknown) name: the default ran
        return spec

    async def embed(
        self,
        inputs: list[EmbeddingInput],
        model: str | None,
        caller: Caller,
        *,
        truncate: bool = False,
        dimensions: int | None = None,
        ignored: list[str] | None = None,
    ) -> Embeddings:
        """One L2-normalised vector per input (cut to `dimensions` and normalised again
        when asked, on models that allow it)."""
        ignored = [header_safe(n) for n in ignored or []]
        spec = self._model(model, False, ignored)
        engine, load_seconds = await self._engine(spec)
        size = engine.info.n_embd
        if (
            dimensions is not None
            and dimensions != size
            and (dimensions > size or not spec.matryoshka)
        ):
            can = f"1..{size}" if spec.matryoshka else f"only {size}"
            raise BadRequestError(
                f"dimensions: model '{spec.id}' makes {size}-number vectors; it can give {can}",
                param="dimensions",
            )
        tokens = await self._tokenize(engine, spec, inputs, truncate)
        started = time.monotonic()
        vectors = await engine.embed(tokens)
        if dimensions is not None and dimensions < size:
            vectors = [_unit(v[:dimensions]) for v in vectors]
        n = sum(len(t) for t in tokens)
        if caller.on_usage is not None:
            caller.on_usage(n)
        return Embeddings(spec.id, vectors, n, time.monotonic() - started, load_seconds, ignored)

    async def load(self, model: str | None) -> tuple[str, float]:
        """Load the embedding model (Ollama's empty request); its id and load time."""
        spec = self._model(model, False, [])
        _, seconds = await self._engine(spec)
        return spec.id, seconds

    async def rerank(
        self,
        query: str,
        documents: list[str],
        model: str | None,
        caller: Caller,
        *,
        top_n: int | None = None,
        truncate: bool = True,
        ignored: list[str] | None = None,
    ) -> Ranking:
        ignored = [header_safe(n) for n in ignored or []]
        spec = self._model(model, True, ignored)
        engine, _ = await self._engine(spec)
        if spec.kind == "rerank" or engine.info.pooling == "rank":
            pairs = [self._pair(engine, query, d, truncate, i) for i, d in enumerate(documents)]
            outputs = await engine.embed(pairs)
            scores = [_sigmoid(float(o[0])) for o in outputs]
            n = sum(len(p) for p in pairs)
        else:
            tokens = await self._tokenize(engine, spec, [query, *documents], truncate)
            vectors = await engine.embed(tokens)
            q = vectors[0]
            scores = [min(1.0, max(0.0, float(q @ v))) for v in vectors[1:]]
            n = sum(len(t) for t in tokens)
        if caller.on_usage is not None:
            caller.on_usage(n)
        order = sorted(range(len(documents)), key=lambda i: scores[i], reverse=True)
        results = [Ranked(i, scores[i], documents[i]) for i in order[: top_n or len(order)]]
        return Ranking(spec.id, results, n, ignored)

    # -- tokens -------------------------------------------------------------------------

    async def _tokenize(
        self,
        engine: Embedder,
        spec: ModelSpec,
        inputs: list[EmbeddingInput],
        truncate: bool,
    ) -> list[list[int]]:
        chars = sum(len(x) for x in inputs if isinstance(x, str))
        if chars > _INLINE_CHARS:
            return await asyncio.to_thread(self._tokens, engine, spec, inputs, truncate)
        return self._tokens(engine, spec, inputs, truncate)

    @staticmethod
    def _tokens(
        engine: Embedder, spec: ModelSpec, inputs: list[EmbeddingInput], truncate: bool
    ) -> list[list[int]]:
        info = engine.info
        out: list[list[int]] = []
        for i, item in enumerate(inputs):
            param = f"input[{i}]" if len(inputs) > 1 else "input"
            if isinstance(item, str):
                if not item:
                    raise BadRequestError(f"{param} is empty", param=param)
                tokens = engine.tokenize(item, add_special=True)
            else:
                bad = next((t for t in item if t >= info.n_vocab), None)
                if bad is not None:
                    raise BadRequestError(
                        f"{param}: token id {bad} is not in the vocabulary (0..{info.n_vocab - 1})",
                        param=param,
                    )
                tokens = item
            out.append(_fit(tokens, info.n_ctx, info.add_eos, truncate, param, spec.id))
        return out

    @staticmethod
    def _pair(engine: Embedder, query: str, document: str, truncate: bool, i: int) -> list[int]:
        """A (query, document) pair as a reranker reads it."""
        info = engine.info
        tokens = engine.pair_tokens(query, document)
        return _fit(tokens, info.n_ctx, info.add_eos, truncate, f"documents[{i}]", "")


def _fit(
    tokens: list[int], n_ctx: int, keep_last: bool, truncate: bool, param: str, model: str
) -> list[int]:
    if not tokens:
        raise BadRequestError(f"{param} is empty", param=param)
    if len(tokens) <= n_ctx:
        return tokens
    if not truncate:
        who = f"model '{model}'" if model else "the model"
        raise BadRequestError(
            f"{param} is {len(tokens)} tokens; {who} reads at most {n_ctx} (send"
            " truncate: true to cut it)",
            param=param,
        )
    # Keep the closing EOS/SEP: last-token pooling reads it.
    return tokens[: n_ctx - 1] + tokens[-1:] if keep_last else tokens[:n_ctx]


def _unit(v: Vector) -> Vector:
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))
