"""The chat completion use case: request -> prompt -> engine -> response or chunk stream."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from server import __version__
from server.engine.types import GenerationHandle, GenerationRequest, SeqOutput
from server.errors import (
    BadRequestError,
    ContextLengthError,
    EngineError,
    HostlerError,
    ModelLoadError,
    NotFoundError,
)
from server.protocol.chat import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    Delta,
    ResponseMessage,
)
from server.protocol.common import (
    ChoiceLogprobs,
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from server.serving.generations import GenerationLog, GenerationRecord
from server.serving.models import ModelService, ServedModel
from server.serving.params import ignored_params, to_sampling_params
from server.serving.prompt import build_prompt

FINGERPRINT = f"hostler-{__version__}"


def _logprobs(outputs: SeqOutput) -> ChoiceLogprobs | None:
    if outputs.logprobs is None:
        return None
    return ChoiceLogprobs(
        content=[
            TokenLogprob(
                token=lp.token,
                logprob=lp.logprob,
                bytes=lp.bytes,
                top_logprobs=[TopLogprob(token=t, logprob=v, bytes=b) for t, v, b in lp.top],
            )
            for lp in outputs.logprobs
        ]
    )


@dataclass
class _Totals:
    prompt: int = 0
    cached: int = 0
    completion: dict[int, int] = field(default_factory=dict)

    def add(self, o: SeqOutput) -> None:
        self.prompt = max(self.prompt, o.prompt_tokens)
        self.cached = max(self.cached, o.cached_tokens)
        self.completion[o.index] = o.completion_tokens

    def usage(self) -> Usage:
        completion = sum(self.completion.values())
        return Usage(
            prompt_tokens=self.prompt,
            completion_tokens=completion,
            total_tokens=self.prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached),
        )


@dataclass
class ChatJob:
    """A request that passed every check and is queued in the engine."""

    id: str
    model_name: str
    served: ServedModel
    handle: GenerationHandle
    n: int
    ignored: list[str]
    record: GenerationRecord
    log: GenerationLog
    created: int = field(default_factory=lambda: int(time.time()))

    async def complete(self) -> ChatCompletion:
        texts = [""] * self.n
        finish: list[str | None] = [None] * self.n
        logprobs: list[list[Any] | None] = [None] * self.n
        totals = _Totals()
        async for outputs in self.handle:
            for o in outputs:
                totals.add(o)
                if o.error:
                    self._close(totals, "error")
                    raise EngineError(o.error)
                texts[o.index] += o.text
                if o.logprobs is not None:
                    logprobs[o.index] = (logprobs[o.index] or []) + (
                        _logprobs(o).content or []  # type: ignore[union-attr]
                    )
                if o.finish_reason:
                    finish[o.index] = o.finish_reason
        self._close(totals, finish[0] or "stop")
        return ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model_name,
            system_fingerprint=FINGERPRINT,
            choices=[
                ChatChoice(
                    index=i,
                    message=ResponseMessage(content=texts[i]),
                    finish_reason=finish[i],
                    logprobs=ChoiceLogprobs(content=logprobs[i])
                    if logprobs[i] is not None
                    else None,
                )
                for i in range(self.n)
            ],
            usage=totals.usage(),
        )

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        """Stream chunks as dicts; an engine failure becomes a final {"error": ...} event."""
        self.record.streamed = True
        totals = _Totals()
        finish: str | None = None

        def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> dict[str, Any]:
            return ChatCompletionChunk(
                id=self.id,
                created=self.created,
                model=self.model_name,
                system_fingerprint=FINGERPRINT,
                choices=choices,
                usage=usage,
            ).model_dump(exclude_none=True)

        yield chunk(
            [ChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(self.n)]
        )
        async for outputs in self.handle:
            choices = []
            for o in outputs:
                totals.add(o)
                if o.error:
                    self._close(totals, "error")
                    yield EngineError(o.error).to_body()
                    return
                if o.text or o.finish_reason or o.logprobs:
                    choices.append(
                        ChunkChoice(
                            index=o.index,
                            delta=Delta(content=o.text) if o.text else Delta(),
                            finish_reason=o.finish_reason,
                            logprobs=_logprobs(o),
                        )
                    )
                if o.finish_reason and o.index == 0:
                    finish = o.finish_reason
            if choices:
                yield chunk(choices)
        self._close(totals, finish or "stop")
        yield chunk([], totals.usage())

    def _close(self, totals: _Totals, finish: str) -> None:
        usage = totals.usage()
        self.record.finish(usage.prompt_tokens, usage.completion_tokens, totals.cached, finish)
        self.log.add(self.record)


class ChatService:
    def __init__(self, models: ModelService, log: GenerationLog) -> None:
        self.models = models
        self.log = log

    async def start(self, request: ChatCompletionRequest, caller: dict[str, str | None]) -> ChatJob:
        """Check everything that can fail up front, then queue the request in the engine."""
        served, name = await self._pick_model(request)
        template = served.template
        if request.template:
            template = self.models.template(served.spec, served.engine, request.template)
        tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None
        prompt = build_prompt(served.engine, template, request.messages, tools)
        info = served.engine.info
        n_prompt = len(prompt.tokens)
        if n_prompt >= info.n_ctx:
            raise ContextLengthError(
                f"the prompt is {n_prompt} tokens; this model's context is {info.n_ctx}",
                param="messages",
            )
        max_tokens = request.requested_max_tokens or served.spec.defaults.max_tokens
        if max_tokens is None:
            max_tokens = info.n_ctx - n_prompt
        elif n_prompt + max_tokens > info.n_ctx:
            raise ContextLengthError(
                f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds this model's"
                f" context of {info.n_ctx} tokens",
                param="max_tokens",
            )
        params = to_sampling_params(request, served.spec.defaults, info.n_vocab)
        stop_text, stop_ids = self._stops(served, request.stop_list, template.stop)
        handle = served.engine.submit(
            GenerationRequest(
                prompt_tokens=prompt.tokens,
                params=params,
                max_tokens=max_tokens,
                stop=stop_text,
                stop_token_ids=stop_ids,
                n=request.n,
            )
        )
        job_id = "gen-" + secrets.token_urlsafe(18)
        record = GenerationRecord(
            id=job_id,
            model=name,
            referer=caller.get("referer"),
            title=caller.get("title"),
        )
        return ChatJob(
            job_id, name, served, handle, request.n, ignored_params(request), record, self.log
        )

    async def _pick_model(self, request: ChatCompletionRequest) -> tuple[ServedModel, str]:
        names = [request.model] if request.model else []
        names += [m for m in request.models or [] if m not in names]
        if not names:
            names = [None]  # type: ignore[list-item]
        last: HostlerError | None = None
        for name in names:
            try:
                served = await self.models.get(name)
                return served, name or served.spec.id
            except (NotFoundError, ModelLoadError) as exc:
                last = exc  # try the next model of a fallback list
        assert last is not None
        raise last

    @staticmethod
    def _stops(
        served: ServedModel, request_stops: list[str], template_stops: tuple[str, ...]
    ) -> tuple[tuple[str, ...], frozenset[int]]:
        """Split stops into text to match and single control tokens to end on."""
        engine = served.engine
        text: list[str] = [s for s in request_stops if s]
        ids: set[int] = set()
        for s in (*template_stops, *request_stops):
            tokens = engine.tokenize(s, add_special=False)
            if len(tokens) == 1 and engine.token_text(tokens[0]) == s and _is_control(s):
                ids.add(tokens[0])
            elif s not in text and not _is_control(s):
                text.append(s)
        if any(not s for s in request_stops):
            raise BadRequestError("stop sequences must not be empty", param="stop")
        return tuple(text), frozenset(ids)


def _is_control(s: str) -> bool:
    return (s.startswith("<") and s.endswith(">")) or (s.startswith("[") and s.endswith("]"))
