"""Ollama's API, for apps that speak only it (Open WebUI's Ollama connection, editor
plugins, home automation): `/api/chat`, `/api/generate`, `/api/tags`, `/api/ps`,
`/api/show`, `/api/version`, with Ollama's NDJSON streaming, and embeddings at
`/api/embed` and the legacy `/api/embeddings`.

A thin adapter: a chat (or a templated `generate`) runs on the one ChatService, a `raw`
generate on the CompletionService; `options` are read under llama.cpp's names by
protocol/aliases.py. `keep_alive` is honoured: the model is unloaded once idle and that
long after the request (0: right after the reply; negative: kept loaded).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from server import durations
from server.api.deps import ChatDep, CompletionsDep, EmbeddingsDep, KeyDep, ModelsDep
from server.api.respond import caller_of, until_disconnected
from server.api.routes.embeddings import finished, json_response
from server.errors import BadRequestError
from server.protocol.chat import ChatCompletion, ChatCompletionRequest
from server.protocol.completions import Completion, CompletionRequest
from server.protocol.embeddings import OllamaEmbeddingsRequest, OllamaEmbedRequest
from server.protocol.ollama import (
    OllamaBase,
    OllamaChatRequest,
    OllamaGenerateRequest,
    OllamaShowRequest,
)
from server.registry import local_file
from server.serving.chat import ChatJob
from server.serving.completions import CompletionJob
from server.serving.models import ModelService, ServedModel

# Ollama's server reads any body as JSON whatever its Content-Type (`curl -d` sends a
# form type): the Guard marks these bodies as JSON (see api/guard.py, OLLAMA_PREFIX).
router = APIRouter(prefix="/api")

OLLAMA_VERSION = "0.9.0"  # the Ollama API this mirrors (clients gate features on it)


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _fields(body: OllamaBase) -> dict[str, Any]:
    """Our request fields from Ollama's: options and format."""
    fields: dict[str, Any] = {**(body.options or {}), "model": body.model}
    if body.think is False:
        fields["reasoning"] = {"enabled": False, "exclude": True}
    elif isinstance(body.think, str):
        fields["reasoning"] = {"effort": body.think}
    if body.format == "json":
        fields["response_format"] = {"type": "json_object"}
    elif isinstance(body.format, dict):
        schema = {"name": "format", "schema": body.format}
        fields["response_format"] = {"type": "json_schema", "json_schema": schema}
    return fields


def keep_alive_seconds(value: str | int | float) -> float:
    """Ollama's keep_alive in seconds; a 400 naming the field if it is not a duration."""
    try:
        return durations.seconds(value)
    except ValueError as exc:
        raise BadRequestError(f"keep_alive: {exc}", param="keep_alive") from exc


async def _keep(models: ModelService, body: OllamaBase) -> None:
    """Apply the request's keep_alive to its model (after a successful start)."""
    if body.keep_alive is not None:
        seconds = keep_alive_seconds(body.keep_alive)
        models.pool.keep_alive((await models.get(body.model)).spec.id, seconds)


def _no_images(images: list[str] | None, param: str) -> None:
    if images:
        raise BadRequestError("this model takes text only; images are not supported", param=param)


class _Run:
    """One Ollama generation: the started job, its clock, and Ollama's output fields
    (`message` for /api/chat, `response` for /api/generate)."""

    def __init__(self, job: ChatJob | CompletionJob, model: str, chat: bool) -> None:
        self.job = job
        self.model = model
        self.chat = chat
        self.start = time.monotonic()
        self.first: float | None = None

    def _text(self, choice: dict[str, Any]) -> tuple[str, str]:
        """A streamed choice's new (text, thinking), from a chat or a completion chunk."""
        if isinstance(self.job, ChatJob):
            delta = choice.get("delta", {})
            return str(delta.get("content") or ""), str(delta.get("reasoning") or "")
        return str(choice.get("text") or ""), ""

    def piece(self, text: str, done: bool = False, thinking: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "created_at": _now()}
        if self.chat:
            out["message"] = {"role": "assistant", "content": text}
            if thinking:
                out["message"]["thinking"] = thinking
        else:
            out["response"] = text
            if thinking:
                out["thinking"] = thinking
        out["done"] = done
        return out

    def final(self, text: str, finish: str | None, thinking: str = "") -> dict[str, Any]:
        end = time.monotonic()
        record = self.job.job.record if isinstance(self.job, ChatJob) else self.job.jobs[0].record
        first = self.first or end
        if record.latency is not None:  # the engine's own time to first output
            first = min(first, self.start + record.latency)
        usage = self.job.job.usage if isinstance(self.job, ChatJob) else self.job.usage
        return {
            **self.piece(text, done=True, thinking=thinking),
            "done_reason": "length" if finish == "length" else "stop",
            "total_duration": int((end - self.start) * 1e9),
            "load_duration": 0,
            "prompt_eval_count": usage.prompt_tokens,
            "prompt_eval_duration": int((first - self.start) * 1e9),
            "eval_count": usage.completion_tokens,
            "eval_duration": int((end - first) * 1e9),
        }

    async def lines(self) -> AsyncIterator[bytes]:
        finish: str | None = None
        async for chunk in self.job.chunks():
            if "error" in chunk:
                yield _line({"error": chunk["error"].get("message", "generation failed")})
                return
            for c in chunk.get("choices", []):
                if c.get("index", 0) != 0:
                    continue
                finish = c.get("finish_reason") or finish
                text, thinking = self._text(c)
                if text or thinking:
                    self.first = self.first or time.monotonic()
                    yield _line(self.piece(text, thinking=thinking))
        yield _line(self.final("", finish))

    async def respond(self, stream: bool, request: Request) -> Response:
        headers = {"X-Hostler-Ignored-Params": ",".join(self.job.ignored)}
        if not self.job.ignored:
            headers = {}
        if stream:
            return StreamingResponse(
                self.lines(), media_type="application/x-ndjson", headers=headers
            )
        result = await until_disconnected(request, self.job.complete())
        if result is None:
            return Response(status_code=499)
        thinking = ""
        if isinstance(result, Completion):
            text, finish = result.choices[0].text, result.choices[0].finish_reason
        else:
            assert isinstance(result, ChatCompletion)
            text = result.choices[0].message.content or ""
            thinking = result.choices[0].message.reasoning or ""
            finish = result.choices[0].finish_reason
        return JSONResponse(self.final(text, finish, thinking), headers=headers)


def _line(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


async def _loaded(models: ModelService, name: str, chat: bool) -> JSONResponse:
    """Ollama's way to preload a model: a request with nothing to generate."""
    await models.get(name)
    key = "message" if chat else "response"
    empty: Any = {"role": "assistant", "content": ""} if chat else ""
    body = {"model": name, "created_at": _now(), key: empty, "done": True, "done_reason": "load"}
    return JSONResponse(body)


@router.post("/chat", response_model=None)
async def chat(
    body: OllamaChatRequest, request: Request, service: ChatDep, models: ModelsDep, key: KeyDep
) -> Response:
    if body.keep_alive is not None:
        keep_alive_seconds(body.keep_alive)  # a bad value is a 400 before anything runs
    if not body.messages:
        response = await _loaded(models, body.model, chat=True)
        await _keep(models, body)
        return response
    for i, m in enumerate(body.messages):
        _no_images(m.images, f"messages[{i}].images")
    fields = _fields(body)
    fields["messages"] = [
        {"role": m.role, "content": m.content, "reasoning_content": m.thinking}
        for m in body.messages
    ]
    if body.tools:
        fields["tools"] = body.tools
    job = await service.start(ChatCompletionRequest.model_validate(fields), caller_of(request, key))
    await _keep(models, body)
    return await _Run(job, body.model, chat=True).respond(body.stream, request)


@router.post("/generate", response_model=None)
async def generate(
    body: OllamaGenerateRequest,
    request: Request,
    chat_service: ChatDep,
    completions: CompletionsDep,
    models: ModelsDep,
    key: KeyDep,
) -> Response:
    _no_images(body.images, "images")
    if body.keep_alive is not None:
        keep_alive_seconds(body.keep_alive)
    if not body.prompt:
        response = await _loaded(models, body.model, chat=False)
        await _keep(models, body)
        return response
    fields = _fields(body)
    caller = caller_of(request, key)
    job: ChatJob | CompletionJob
    if body.raw:
        if body.system:
            fields["system"] = body.system  # no template, so no place for it: reported
        job = await completions.start(
            CompletionRequest.model_validate({**fields, "prompt": body.prompt}), caller
        )
    else:
        messages = [{"role": "system", "content": body.system}] if body.system else []
        messages.append({"role": "user", "content": body.prompt})
        request_fields = {**fields, "messages": messages}
        job = await chat_service.start(ChatCompletionRequest.model_validate(request_fields), caller)
    await _keep(models, body)
    return await _Run(job, body.model, chat=False).respond(body.stream, request)


def _details(served: ServedModel | None, size: int) -> dict[str, Any]:
    desc = served.engine.info.description.split() if served else []
    return {
        "format": "gguf",
        "family": desc[0] if desc else "",
        "families": None,
        "parameter_size": desc[1] if len(desc) > 1 else "",
        "quantization_level": desc[2] if len(desc) > 2 else "",
        "size": size,
    }


@router.get("/tags")
async def tags(models: ModelsDep) -> dict[str, Any]:
    """The models that are downloaded (Ollama lists only local ones)."""
    out = []
    loaded = models.pool.loaded
    for spec in models.registry:
        path = local_file(spec)
        if path is None:
            continue
        engine = loaded.get(spec.id)
        served = await models.get(spec.id) if engine is not None else None
        size = path.stat().st_size
        stamp = datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat()
        entry = {"name": spec.id, "model": spec.id, "modified_at": stamp, "size": size}
        out.append({**entry, "digest": "", "details": _details(served, size)})
    return {"models": out}


@router.get("/ps")
async def ps(models: ModelsDep) -> dict[str, Any]:
    out = []
    for name in models.pool.loaded:
        served = await models.get(name)
        info = served.engine.info
        vram = info.size_bytes if info.gpu_offload else 0
        out.append(
            {
                "name": name,
                "model": name,
                "size": info.size_bytes,
                "size_vram": vram,
                "digest": "",
                "details": _details(served, info.size_bytes),
                "expires_at": "2999-01-01T00:00:00Z",  # no idle unload (yet)
                "context_length": info.n_ctx,
            }
        )
    return {"models": out}


@router.get("/version")
async def version() -> dict[str, Any]:
    return {"version": OLLAMA_VERSION}


@router.post("/show")
async def show(body: OllamaShowRequest, models: ModelsDep) -> dict[str, Any]:
    name = body.model or body.name
    if not name:
        raise BadRequestError("the field 'model' is required", param="model")
    served = await models.get(name)
    info = served.engine.info
    details = _details(served, info.size_bytes)
    arch = details["family"] or "llama"
    return {
        "modelfile": "",
        "parameters": "",
        "template": served.template.source,
        "details": details,
        "model_info": {
            "general.architecture": arch,
            "general.parameter_count": info.n_params,
            f"{arch}.context_length": info.n_ctx,
        },
        "capabilities": ["embedding"] if served.spec.embedding else ["completion", "tools"],
    }


def _keep_embedding(models: ModelService, model: str, keep_alive: str | int | float | None) -> None:
    if keep_alive is not None:
        models.pool.keep_alive(model, keep_alive_seconds(keep_alive))


def _embed_ignored(body: OllamaEmbedRequest | OllamaEmbeddingsRequest) -> list[str]:
    return sorted(body.model_extra or {}) + (["options"] if body.options else [])


@router.post("/embed", response_model=None)
async def embed(
    body: OllamaEmbedRequest,
    request: Request,
    service: EmbeddingsDep,
    models: ModelsDep,
    key: KeyDep,
) -> Response:
    """`{model, input}` -> `{model, embeddings}`; no input loads the model."""
    if body.keep_alive is not None:
        keep_alive_seconds(body.keep_alive)  # a bad value is a 400 before anything runs
    started = time.monotonic()
    if not body.input:
        model_id, load = await service.load(body.model)
        _keep_embedding(models, model_id, body.keep_alive)
        return json_response(
            {"model": body.model or model_id, "embeddings": [],
             "total_duration": int((time.monotonic() - started) * 1e9),
             "load_duration": int(load * 1e9), "prompt_eval_count": 0}
        )  # fmt: skip
    work = service.embed(
        list(body.input),
        body.model,
        caller_of(request, key),
        truncate=body.truncate,
        dimensions=body.dimensions,
        ignored=_embed_ignored(body),
    )
    result = await finished(request, work)
    if isinstance(result, Response):
        return result
    _keep_embedding(models, result.model, body.keep_alive)
    out = {
        "model": body.model or result.model,
        "embeddings": result.vectors,
        "total_duration": int((time.monotonic() - started) * 1e9),
        "load_duration": int(result.load_seconds * 1e9),
        "prompt_eval_count": result.tokens,
    }
    return json_response(out, result.ignored)


@router.post("/embeddings", response_model=None)
async def embeddings(
    body: OllamaEmbeddingsRequest,
    request: Request,
    service: EmbeddingsDep,
    models: ModelsDep,
    key: KeyDep,
) -> Response:
    """The legacy `{model, prompt}` -> `{embedding}` (SillyTavern's Ollama source)."""
    if body.keep_alive is not None:
        keep_alive_seconds(body.keep_alive)
    if not body.prompt:
        model_id, _ = await service.load(body.model)
        _keep_embedding(models, model_id, body.keep_alive)
        return json_response({"embedding": []})
    work = service.embed(
        [body.prompt], body.model, caller_of(request, key), truncate=True,
        ignored=_embed_ignored(body),
    )  # fmt: skip
    result = await finished(request, work)
    if isinstance(result, Response):
        return result
    _keep_embedding(models, result.model, body.keep_alive)
    return json_response({"embedding": result.vectors[0]}, result.ignored)
