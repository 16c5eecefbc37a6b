"""Which models can be served: the registry joined with the pool of loaded engines."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from server.config import Settings
from server.engine.pool import ModelPool
from server.engine.types import Engine
from server.errors import HostlerError, ModelLoadError, ModelNotFoundError
from server.protocol.models import Architecture, ModelCard, TopProvider
from server.registry import ModelSpec, Registry, local_file, verify
from server.templates import ChatTemplate, load_template
from server.templates.render import TemplateError

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
    "banned_strings", "preset",
]  # fmt: skip


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


def make_loader(registry: Registry, settings: Settings) -> Callable[[str], Engine]:
    """The production loader: find the file, verify it, start a LlamaEngine on it."""

    def load(model_id: str) -> Engine:
        from server.engine.cache import open_cache
        from server.engine.llama import ContextOptions, gpu_offload_supported
        from server.engine.scheduler import LlamaEngine

        spec = registry.get(model_id)
        path = _model_file(registry, model_id)
        gpu = gpu_offload_supported()
        options = ContextOptions(
            n_ctx=spec.context,
            slots=settings.slots or default_slots(spec, gpu),
            n_batch=settings.batch_size,
            n_ubatch=settings.batch_size,
            n_threads=settings.threads or (os.cpu_count() or 1),
            n_gpu_layers=spec.n_gpu_layers if gpu else 0,
            flash_attn=settings.flash_attn,
        )
        cache = open_cache(
            path,
            {"n_ctx": options.n_ctx, "flash_attn": options.flash_attn, "gpu": gpu},
            ram_mib=settings.cache_ram_mib,
            disk_gib=settings.cache_disk_gib,
            folder=settings.cache_dir,
        )
        reuse = spec.cache_reuse if settings.cache_reuse is None else settings.cache_reuse
        try:
            return LlamaEngine(
                path, options, max_queue=settings.max_queue, cache_reuse=reuse, prompt_cache=cache
            )
        except BaseException:
            if cache is not None:
                cache.close()
            raise

    return load


class ModelService:
    def __init__(self, registry: Registry, pool: ModelPool, default_model: str | None) -> None:
        self.registry = registry
        self.pool = pool
        self.default_model = default_model
        self.created = int(time.time())
        self._templates: dict[tuple[str, str | None], ChatTemplate] = {}

    async def get(self, name: str | None) -> ServedModel:
        name = name or self.default_model
        if not name:
            raise ModelNotFoundError("no model given and no default model set", param="model")
        spec = self.registry.get(name)
        try:
            engine = await self.pool.get(spec.id)
        except HostlerError:
            raise  # already a client-facing error (e.g. not downloaded)
        except Exception as exc:
            raise ModelLoadError(f"model '{spec.id}' could not be loaded: {exc}") from exc
        return ServedModel(spec, engine, self.template(spec, engine, spec.template))

    def template(self, spec: ModelSpec, engine: Engine, name: str | None) -> ChatTemplate:
        key = (spec.id, name)
        cached = self._templates.get(key)
        if cached is None:
            try:
                cached = load_template(name, engine.info.chat_template)
            except TemplateError as exc:
                from server.errors import BadRequestError

                raise BadRequestError(str(exc), param="template") from exc
            self._templates[key] = cached
        return cached

    def cards(self) -> list[ModelCard]:
        cards = []
        loaded = self.pool.loaded
        for spec in self.registry:
            engine = loaded.get(spec.id)
            ctx = engine.info.n_ctx if engine else spec.context
            present = engine is not None or local_file(spec) is not None
            for model_id in (spec.id, *spec.aliases):
                cards.append(
                    ModelCard(
                        id=model_id,
                        created=self.created,
                        name=spec.name or spec.id,
                        description=spec.description or "",
                        context_length=ctx,
                        architecture=Architecture(instruct_type=spec.template or "gguf"),
                        top_provider=TopProvider(context_length=ctx),
                        supported_parameters=SUPPORTED_PARAMETERS,
                        hostler={
                            "model": spec.id,
                            "loaded": engine is not None,
                            "present": present,
                        },
                    )
                )
        return cards
