"""llama-server's native API, for frontends set to "llama.cpp" (SillyTavern's Text
Completion type among them): `POST /completion`, `/tokenize`, `/detokenize`, `GET /props`,
`/embedding(s)` and `/rerank(ing)`.

A thin adapter: the request becomes a text completion on the one CompletionService,
and its result (or stream) is reshaped into llama-server's fields (`content`, `stop`,
`tokens_predicted`, `completion_probabilities`, ...).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server import __version__
from server.api.deps import (
    ChatDep,
    CompletionsDep,
    EmbeddingsDep,
    KeyDep,
    ModelsDep,
    SettingsDep,
)
from server.api.dialects.tokens import decode, encode
from server.api.respond import caller_of, until_disconnected
from server.api.routes.embeddings import embed, json_response, rerank
from server.api.sse import sse_response
from server.protocol.chat import ChatCompletionRequest
from server.protocol.completions import (
    Completion,
    CompletionLogprobs,
    CompletionRequest,
    completion_from,
)
from server.protocol.embeddings import LlamaEmbeddingRequest
from server.protocol.llamacpp import DetokenizeRequest, NativeCompletionRequest, TokenizeRequest
from server.serving.completions import CompletionJob

router = APIRouter()

# OpenAI finish reasons -> llama-server's stop_type.
_STOP_TYPE = {"stop": "eos", "length": "limit", "cancelled": "none"}


def _as_completion(body: NativeCompletionRequest) -> CompletionRequest:
    fields: dict[str, Any] = {"prompt": body.prompt if body.prompt != [] else ""}
    if body.n_probs:
        fields["logprobs"] = body.n_probs
    return completion_from(body, {"n_probs", "cache_prompt", "prompt"}, **fields)


def _probabilities(lp: dict[str, Any] | CompletionLogprobs | None) -> list[dict[str, Any]]:
    """Legacy logprobs as llama-server's `completion_probabilities` (both of its forms:
    `probs` with `tok_str`/`prob`, and `top_logprobs` with `token`/`logprob`)."""
    if lp is None:
        return []
    data = lp if isinstance(lp, dict) else lp.model_dump()
    out = []
    for token, logprob, top in zip(
        data["tokens"], data["token_logprobs"], data["top_logprobs"], strict=False
    ):
        alternatives = sorted(top.items(), key=lambda kv: -kv[1])
        out.append(
            {
                "content": token,
                "token": token,
                "logprob": logprob,
                "probs": [{"tok_str": t, "prob": math.exp(v)} for t, v in alternatives],
                "top_logprobs": [{"token": t, "logprob": v} for t, v in alternatives],
            }
        )
    return out


def _final(job: CompletionJob, text: str, finish: str | None, model: str) -> dict[str, Any]:
    usage = job.usage
    return {
        "content": text,
        "stop": True,
        "model": model,
        "tokens_predicted": usage.completion_tokens,
        "tokens_evaluated": usage.prompt_tokens,
        "tokens_cached": usage.prompt_tokens_details.cached_tokens,
        "stop_type": _STOP_TYPE.get(finish or "stop", "none"),
        "stopping_word": "",
        "truncated": False,
        "index": 0,
    }


async def _native_chunks(job: CompletionJob, model: str) -> AsyncIterator[dict[str, Any]]:
    finish: str | None = None
    async for chunk in job.chunks():
        if "error" in chunk:
            yield chunk
            return
        for c in chunk.get("choices", []):
            if c.get("index", 0) != 0:
                continue  # llama-server has no n: the first choice only
            finish = c.get("finish_reason") or finish
            if c.get("text") or c.get("logprobs"):
                out: dict[str, Any] = {"content": c.get("text", ""), "stop": False, "index": 0}
                probs = _probabilities(c.get("logprobs"))
                if probs:
                    out["completion_probabilities"] = probs
                yield out
    yield _final(job, "", finish, model)


@router.post("/completion", response_model=None)
async def completion(
    body: NativeCompletionRequest,
    request: Request,
    service: CompletionsDep,
    settings: SettingsDep,
    key: KeyDep,
) -> Response:
    job = await service.start(_as_completion(body), caller_of(request, key))
    model = job.jobs[0].model_name
    headers = {"X-Hostler-Ignored-Params": ",".join(job.ignored)} if job.ignored else None
    if body.stream:
        return sse_response(
            _native_chunks(job, model),
            keepalive=settings.keepalive,
            grace=settings.shutdown_grace,
            cancel=job.cancel,
            headers=headers,
        )
    result: Completion | None = await until_disconnected(request, job.complete())
    if result is None:
        return Response(status_code=499)
    choice = result.choices[0]
    data = _final(job, choice.text, choice.finish_reason, model)
    probs = _probabilities(choice.logprobs)
    if probs:
        data["completion_probabilities"] = probs
    return JSONResponse(data, headers=headers)


@router.post("/tokenize")
@router.post("/v1/tokenize")
async def tokenize(body: TokenizeRequest, models: ModelsDep, chat: ChatDep) -> dict[str, Any]:
    """llama-server's shape (`tokens`, pieces on request) with vLLM's `count` and
    `max_model_len`; `messages` are rendered with the model's template first."""
    if body.messages is not None:
        request = ChatCompletionRequest.model_validate(
            {"model": body.model, "messages": body.messages}
        )
        ids = await chat.prompt_tokens(request)
    else:
        text = body.content if body.content is not None else body.prompt or ""
        # vLLM adds the model's special tokens unless told not to; llama-server does not.
        add = body.add_special if body.add_special is not None else body.prompt is not None
        ids = await encode(models, text, body.model, add_special=add)
    engine = (await models.get(body.model)).engine
    tokens: list[Any] = ids
    if body.with_pieces:
        tokens = [{"id": t, "piece": engine.token_text(t)} for t in ids]
    return {"tokens": tokens, "count": len(ids), "max_model_len": engine.info.n_ctx}


@router.post("/v1/detokenize")
async def detokenize_v1(body: DetokenizeRequest, models: ModelsDep) -> dict[str, Any]:
    text = await decode(models, body.tokens, body.model)
    return {"prompt": text, "content": text}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, models: ModelsDep) -> dict[str, Any]:
    return {"content": await decode(models, body.tokens, body.model)}


@router.get("/props")
async def props(models: ModelsDep) -> dict[str, Any]:
    served = await models.get(None)
    info = served.engine.info
    return {
        "default_generation_settings": {
            "n_ctx": info.n_ctx,
            "model": served.spec.id,
            "params": served.spec.defaults.model_dump(exclude_none=True),
        },
        "total_slots": info.slots,
        "model_path": served.spec.id,
        "chat_template": served.template.source,
        "modalities": {"vision": False, "audio": False},
        "build_info": f"hostler {__version__}",
    }


@router.post("/embedding", response_model=None)
@router.post("/embeddings", response_model=None)
async def embeddings(
    body: LlamaEmbeddingRequest, request: Request, service: EmbeddingsDep, key: KeyDep
) -> Response:
    """llama-server's native shape: [{index, embedding: [vector]}] (one pooled vector)."""
    result = await embed(body, request, service, key)
    if isinstance(result, Response):
        return result
    out = [{"index": i, "embedding": [v]} for i, v in enumerate(result.vectors)]
    return json_response(out, result.ignored)


# llama-server's rerank paths at the root (the /v1 ones are the OpenAI router's).
router.add_api_route("/rerank", rerank, methods=["POST"], response_model=None)
router.add_api_route("/reranking", rerank, methods=["POST"], response_model=None)
