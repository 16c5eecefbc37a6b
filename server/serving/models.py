"""Which models can be served: the registry joined with the pool of loaded engines."""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from server.config import Settings
from server.engine.pool import ModelPool
from server.engine.types import Engine
from server.errors import (
    BadRequestError,
    HostlerError,
    ModelLoadError,
    ModelNotFoundError,
    ServiceUnavailableError,
)
from server.protocol.models import Architecture, ModelCard, TopProvider
from server.registry import ModelSpec, Registry, local_file, verify
from server.templates import ChatTemplate, load_template
from server.templates.render import TemplateError

if TYPE_CHECKING:
    from server.engine.llama import ContextOptions

log = logging.getLogger("hostler.models")

REVIVE_EVERY = 5.0
"""Seconds between tries to load the default model again after its engine died."""

SUPPORTED_PARAMETERS = [
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "top_a", "typical_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "seed", "stop",
    "logit_bias", "logprobs", "top_logprobs", "n", "min_tokens", "ignore_eos",
    "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n",
    "dry_sequence_breakers", "xtc_threshold", "xtc_probability", "mirostat_mode",
    "mirostat_tau", "mirostat_eta", "dynatemp_range", "dynatemp_exponent", "top_n_sigma",
    "sampler_order", "stream", "stream_options", "response_format", "structured_outputs",
    "tools", "tool_choice", "transforms", "repetition_penalty_range", "tfs",
    "smoothing_factor", "smoothing_curve", "adaptive_target", "adaptive_decay",
    "banned_strings", "preset", "keep_alive", "reasoning", "include_reasoning",
    "reasoning_effort", "chat_template_kwargs", "speculative",
]  # fmt: skip


EMBEDDING_PARAMETERS = ["input", "encoding_format", "truncate", "top_n", "return_documents"]


@dataclass(frozen=True)
class ServedModel:
    spec: ModelSpec
    engine: Engine
    template: ChatTemplate


def default_slots(spec: ModelSpec, gpu: bool) -> int:
    return 8 if gpu and spec.n_gpu_layers != 0 else 4


def make_check(registry: Registry) -> Callable[[str], None]:
    """The checks that need no loading: registered, downloaded, verified."""

    def check(model_id: str) -> None:
        _model_file(registry, model_id)

    return check


def _model_file(registry: Registry, model_id: str) -> Path:
    spec = registry.get(model_id)
    path = local_file(spec)
    if path is None:
        raise ModelNotFoundError(
            f"model '{model_id}' is not downloaded; run `hostler pull {model_id}`",
            param="model",
        )
    try:
        verify(spec, path)
    except Exception as exc:
        raise ModelLoadError(f"model '{model_id}' failed verification: {exc}") from exc
    return Path(path)


def context_options(spec: ModelSpec, settings: Settings, path: Path) -> ContextOptions:
    """How to load `spec`: the model's GPU and batch settings over the server's."""
    from server.engine.gguf import read_shape
    from server.engine.gpu import fit_layers, gpus
    from server.engine.llama import ContextOptions, gpu_offload_supported

    gpu = gpu_offload_supported()
    flash = spec.flash_attn if spec.flash_attn is not None else settings.flash_attn
    if spec.kv_cache_type != "f16":
        flash = True  # llama.cpp needs it for a quantized V cache
    layers = spec.n_gpu_layers if gpu else 0
    if spec.rpc and (spec.gpu_layers in (0, "auto")):
        layers = -1  # a model split over workers puts its layers on the devices
    if gpu and spec.gpu_layers == "auto" and not spec.rpc:
        devices = gpus()
        if spec.tensor_split:
            free = sum(d.free for d in devices)
        else:
            free = devices[spec.main_gpu].free if spec.main_gpu < len(devices) else 0
        layers = fit_layers(read_shape(path), spec.context, spec.kv_cache_type, free)
        log.info("model %s: gpu_layers auto -> %s (%d MiB free)", spec.id, layers, free >> 20)
    batch = spec.batch_size or settings.batch_size
    return ContextOptions(
        n_ctx=spec.context,
        slots=settings.slots or default_slots(spec, gpu),
        n_batch=batch,
        n_ubatch=min(spec.ubatch_size or batch, batch),
        n_threads=settings.threads or (os.cpu_count() or 1),
        n_gpu_layers=layers,
        flash_attn=flash,
        kv_type=spec.kv_cache_type,
        main_gpu=spec.main_gpu,
        tensor_split=spec.tensor_split,
        rpc=spec.rpc,
        # With workers the fit is made where their devices are known: in the engine.
        fit_devices=bool(spec.rpc) and spec.gpu_layers == "auto",
    )


# Inputs one embedding decode may hold (each its own sequence; llama.cpp allows 256).
EMBEDDING_SLOTS = 64


def embedding_options(spec: ModelSpec, settings: Settings, path: Path) -> ContextOptions:
    """An embedding model's context: its physical batch is the whole context, so any
    input that fits the context fits one decode (a non-causal model needs that)."""
    import dataclasses

    options = context_options(spec, settings, path)
    return dataclasses.replace(
        options,
        slots=min(EMBEDDING_SLOTS, spec.context),
        n_batch=spec.context,
        n_ubatch=spec.context,
        embeddings=True,
        pooling=spec.pooling,
    )


def make_loader(registry: Registry, settings: Settings) -> Callable[[str], Engine]:
    """The production loader: find the file, verify it, start its engine process (an
    EmbeddingEngine for an embedding model, else a LlamaEngine, each in a child process
    of its own: engine/process.py)."""

    def load(model_id: str) -> Engine:
        from server.engine.process import ProcessEngine

        spec = registry.get(model_id)
        path = _model_file(registry, model_id)
        if spec.embedding:
            kwargs: dict[str, object] = {
                "max_queue": settings.max_queue,
                "batch_tokens": spec.batch_size or settings.batch_size,
            }
            options = embedding_options(spec, settings, path)
            return ProcessEngine(
                model_id, "embedding", path, options, kwargs, max_queue=settings.max_queue
            )
        options = context_options(spec, settings, path)
        reuse = spec.cache_reuse if settings.cache_reuse is None else settings.cache_reuse
        cache = None
        if settings.cache_ram_mib > 0 or settings.cache_disk_gib > 0:
            cache = {
                "settings": {
                    "n_ctx": options.n_ctx,
                    "flash_attn": options.flash_attn,
                    "gpu": options.n_gpu_layers != 0,
                    "kv": options.kv_type,
                },
                "ram_mib": settings.cache_ram_mib,
                "disk_gib": settings.cache_disk_gib,
                "folder": settings.cache_dir,
            }
        kwargs = {
            # The API process bounds the queue (slots + max_queue open requests).
            "max_queue": settings.max_queue + options.slots,
            "cache_reuse": reuse,
            "prompt_cache": cache,
            "speculative": spec.speculative or settings.speculative,
        }
        return ProcessEngine(model_id, "chat", path, options, kwargs, max_queue=settings.max_queue)

    return load


def make_estimate(registry: Registry) -> Callable[[str], int]:
    """Bytes a model will hold once loaded: its file plus its KV cache at full context."""

    def estimate(model_id: str) -> int:
        from server.engine.gguf import read_shape

        spec = registry.get(model_id)
        path = local_file(spec)  # verified by the pool's check just before
        if path is None:
            return 0
        shape = read_shape(Path(path))
        return shape.file_bytes + shape.kv_bytes(spec.context, spec.kv_cache_type)

    return estimate


class ModelService:
    def __init__(
        self,
        registry: Registry,
        pool: ModelPool,
        default_model: str | None,
        fallback: list[str] | None = None,
        embedding_model: str | None = None,
    ) -> None:
        self.registry = registry
        self.pool = pool
        self.default_model = default_model
        self.embedding_model = embedding_model
        """The model for embedding requests that name none (else the first downloaded)."""
        self.fallback = [p.lower() for p in fallback or []]
        """Names that mean the default model (glob patterns, e.g. claude-*)."""
        self.created = int(time.time())
        self._templates: dict[tuple[str, str | None], ChatTemplate] = {}
        self.starting: str | None = None
        """The model loaded at start-up, while it loads: requests get 503 until then."""
        self.starting_phase = "loading"
        """Or "downloading", while the start-up model is fetched first."""
        self.revive_error: str | None = None
        """Why the default model could not be loaded again after its engine died."""
        self._revived: float = 0.0
        self._revive_tried: float = 0.0
        self._revive_task: asyncio.Future[None] | None = None

    @property
    def reviving(self) -> bool:
        """The default model's engine died and it is not loaded again yet."""
        model_id = self.default_id()
        if model_id is None:
            return False
        death = self.pool.deaths.get(model_id)
        return (
            death is not None
            and death[0] > self._revived
            and model_id not in self.pool.failed
            and not self.pool.is_loaded(model_id)
        )

    def revive(self) -> None:
        """Load the default model again once its engine died (called by the reaper), not
        on the next request: a router that probes /health sends no request to a replica
        that answers 503, so it would never come back. Tried every REVIVE_EVERY seconds
        while it fails (an RPC worker that is still down); a model marked failed (a crash
        loop) waits for an explicit load."""
        model_id = self.default_id()
        if model_id is None or self.starting is not None:
            return
        death = self.pool.deaths.get(model_id)
        if death is not None and self.pool.is_loaded(model_id):
            self._revived, self.revive_error = death[0], None
        if not self.reviving or (self._revive_task and not self._revive_task.done()):
            return
        now = time.monotonic()
        if now - self._revive_tried < REVIVE_EVERY:
            return
        self._revive_tried = now
        self._revive_task = asyncio.ensure_future(self._reload(model_id))

    async def _reload(self, model_id: str) -> None:
        try:
            await self.pool.get(model_id)
        except Exception as exc:
            self.revive_error = f"model '{model_id}' could not be loaded again: {exc}"
            log.warning("%s (tried again in %.0f s)", self.revive_error, REVIVE_EVERY)
        else:
            self.revive_error = None
            log.info("model %s loaded again after its engine died", model_id)

    def default_id(self) -> str | None:
        if not self.default_model or self.default_model not in self.registry:
            return None
        return self.registry.get(self.default_model).id

    def close(self) -> None:
        if self._revive_task is not None:
            self._revive_task.cancel()

    def resolve(self, name: str | None) -> ModelSpec:
        if name and name not in self.registry and self.is_fallback(name):
            chat = (k for k in self.pool.loaded if not self.registry.get(k).embedding)
            name = self.default_model or next(chat, None)
            if name is None:
                raise ModelNotFoundError(
                    "no default model is set for names like this one; start the server with"
                    " --model NAME",
                    param="model",
                )
        name = name or self.default_model
        if not name:
            raise ModelNotFoundError("no model given and no default model set", param="model")
        return self.registry.get(name)

    def is_fallback(self, name: str) -> bool:
        lowered = name.lower()
        return any(fnmatch.fnmatchcase(lowered, p) for p in self.fallback)

    def needs_load(self, name: str | None) -> bool:
        """True when a request for `name` would wait for its model to load (a
        registered, downloaded model that is not loaded)."""
        if self.starting is not None:
            return False  # the start-up load: a plain 503 until it is done
        try:
            spec = self.resolve(name)
        except HostlerError:
            return False
        return not self.pool.is_loaded(spec.id) and local_file(spec) is not None

    async def get(self, name: str | None, *, chat: bool = False) -> ServedModel:
        """The model `name` (the default if None), loaded. With `chat`, an embedding
        model is a 400: it makes vectors, not text."""
        spec = self.resolve(name)
        if chat and spec.embedding:
            raise BadRequestError(
                f"model '{spec.id}' is an embedding model: it makes vectors (POST"
                " /v1/embeddings), not text; name a chat model",
                param="model",
            )
        engine = await self.engine(spec)
        return ServedModel(spec, engine, self.template(spec, engine, spec.template))

    async def engine(self, spec: ModelSpec) -> Engine:
        """`spec`'s engine, loading it first if need be (503 while the start-up model
        loads)."""
        if self.starting is not None:
            started = self.pool.loading.get(self.starting)
            waited = f" ({time.monotonic() - started:.0f} s so far)" if started else ""
            raise ServiceUnavailableError(
                f"model '{self.starting}' is {self.starting_phase}{waited}; try again shortly",
                headers={"Retry-After": "5"},
            )
        try:
            engine = await self.pool.get(spec.id)
        except HostlerError:
            raise  # already a client-facing error (e.g. not downloaded)
        except Exception as exc:
            raise ModelLoadError(f"model '{spec.id}' could not be loaded: {exc}") from exc
        return engine

    def resolve_embedding(self, name: str | None, *, rerank: bool = False) -> ModelSpec:
        """The model for an embedding (or rerank) request: the one named if it is an
        embedding model, else the default one (SillyTavern's llama.cpp source names no
        model; Open WebUI may name the chat model). A 400 when there is none."""
        spec = self._named_embedding(name)
        if spec is None:
            spec = self._default_embedding(rerank)
        if not rerank and spec.kind == "rerank":
            raise BadRequestError(
                f"model '{spec.id}' is a reranker: it scores documents (POST /v1/rerank),"
                " it does not make vectors",
                param="model",
            )
        return spec

    def _named_embedding(self, name: str | None) -> ModelSpec | None:
        if not name:
            return None
        for candidate in (name, name.removesuffix(":latest")):  # Ollama's tag
            if candidate in self.registry:
                spec = self.registry.get(candidate)
                return spec if spec.embedding else None
        return None

    def _default_embedding(self, rerank: bool) -> ModelSpec:
        entries = [s for s in self.registry if s.embedding]
        if rerank:
            rankers = [s for s in entries if s.kind == "rerank" and local_file(s) is not None]
            if rankers:
                return rankers[0]
        if self.embedding_model:
            return self.registry.get(self.embedding_model)
        vectors = [s for s in entries if s.kind == "embedding"]
        downloaded = [s for s in vectors if local_file(s) is not None]
        if downloaded or vectors:
            return (downloaded or vectors)[0]
        raise BadRequestError(
            "no embedding model is set up: add an entry with `embedding: true` to"
            " models.yaml (the packaged registry has smollm2-135m-embed and"
            " nomic-embed-text-v1.5), or start the server with --embedding-model NAME",
            param="model",
        )

    def template(self, spec: ModelSpec, engine: Engine, name: str | None) -> ChatTemplate:
        key = (spec.id, name)
        cached = self._templates.get(key)
        if cached is None:
            try:
                cached = load_template(name, engine.info.chat_template)
            except TemplateError as exc:
                raise BadRequestError(str(exc), param="template") from exc
            self._templates[key] = cached
        return cached

    async def unload(self, name: str) -> bool:
        """Unload a model (once its replies are done); False if it was not loaded."""
        return await self.pool.unload(self.resolve(name).id)

    def status(self) -> list[dict[str, object]]:
        """What is loaded (and loading), for `hostler ps` and GET /v1/ps: each with its
        kind (chat, embedding, rerank)."""
        out = self.pool.status()
        model_id = self.default_id()
        if self.revive_error is not None and not any(e["model"] == model_id for e in out):
            out.append({"model": model_id, "state": "error", "error": self.revive_error})
        for entry in out:
            entry["kind"] = self.registry.get(str(entry["model"])).kind
        return out

    def cards(self, everything: bool = False) -> list[ModelCard]:
        """One card per model (aliases as a field); only those that can load, unless
        `everything` (then `hostler.downloaded` says which)."""
        cards = []
        loaded = self.pool.loaded
        # Chat models first: SillyTavern and others take the first id as the model.
        for spec in sorted(self.registry, key=lambda s: s.embedding):
            engine = loaded.get(spec.id)
            downloaded = engine is not None or local_file(spec) is not None
            if downloaded or everything:
                cards.append(self._card(spec, engine, downloaded))
        return cards

    def card(self, name: str) -> ModelCard:
        spec = self.resolve(name)
        engine = self.pool.loaded.get(spec.id)
        return self._card(spec, engine, engine is not None or local_file(spec) is not None)

    def _card(self, spec: ModelSpec, engine: Engine | None, downloaded: bool) -> ModelCard:
        ctx = engine.info.n_ctx if engine else spec.context
        if spec.embedding:
            output = "embeddings" if spec.kind == "embedding" else "scores"
            architecture = Architecture(
                modality=f"text->{output}", instruct_type=None, output_modalities=[output]
            )
            parameters = EMBEDDING_PARAMETERS + (["dimensions"] if spec.matryoshka else [])
        else:
            architecture = Architecture(instruct_type=spec.template or "gguf")
            parameters = SUPPORTED_PARAMETERS
        return ModelCard(
            id=spec.id,
            created=self.created,
            created_at=datetime.fromtimestamp(self.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            display_name=spec.name or spec.id,
            name=spec.name or spec.id,
            description=spec.description or "",
            context_length=ctx,
            aliases=list(spec.aliases),
            architecture=architecture,
            top_provider=TopProvider(context_length=ctx),
            supported_parameters=parameters,
            hostler={
                "kind": spec.kind,
                "loaded": engine is not None,
                "loading": spec.id in self.pool.loading,
                "downloaded": downloaded,
                "pinned": spec.pinned,
                "presets": sorted(spec.presets),
            },
        )
