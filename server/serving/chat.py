"""The chat completion use case: messages -> prompt -> engine -> response or chunk stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from server.engine.types import SeqOutput
from server.engine.types import TokenLogprob as EngineLogprob
from server.errors import BadRequestError, ContextLengthError, EngineError
from server.protocol.chat import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    ResponseMessage,
    ToolCall,
)
from server.protocol.common import ChoiceLogprobs, TokenLogprob, TopLogprob
from server.protocol.completions import CompletionRequest, completion_from
from server.serving.completions import CompletionJob, CompletionService
from server.serving.job import FINGERPRINT, Caller, Job, JobFactory, Submission, native_finish
from server.serving.models import ServedModel
from server.serving.prompt import (
    Prompt,
    build_prompt,
    byte_limit,
    render_prompt,
    tokenize_prompt,
)
from server.serving.structured import check_grammar, requested_grammar
from server.serving.tools import ToolCallStream, ToolPlan, plan_tools
from server.serving.transforms import middle_out, middle_out_enabled
from server.templates import ChatTemplate


def chat_logprobs(items: list[EngineLogprob] | None) -> ChoiceLogprobs | None:
    if items is None:
        return None
    return ChoiceLogprobs(
        content=[
            TokenLogprob(
                token=lp.token,
                logprob=lp.logprob,
                bytes=lp.bytes,
                top_logprobs=[TopLogprob(token=t, logprob=v, bytes=b) for t, v, b in lp.top],
            )
            for lp in items
        ]
    )


@dataclass
class ChatJob:
    job: Job
    tools: ToolPlan | None

    @property
    def ignored(self) -> list[str]:
        return self.job.ignored

    def cancel(self) -> None:
        self.job.handle.cancel()

    def _tool_stream(self) -> ToolCallStream | None:
        if self.tools is None or not self.tools.parse:
            return None
        return ToolCallStream(self.tools.fmt, self.tools.prefill)

    async def complete(self) -> ChatCompletion:
        job = self.job
        choices = []
        for i, c in enumerate(await job.collect()):
            content: str | None = c.text
            calls: list[ToolCall] | None = None
            finish = c.finish_reason
            split = self._tool_stream()
            if split is not None:
                content = split.push(c.text) + split.finish()
                if split.calls:
                    calls, finish = split.calls, "tool_calls"
                    content = content or None
            choices.append(
                ChatChoice(
                    index=i,
                    message=ResponseMessage(content=content, tool_calls=calls),
                    finish_reason=finish,
                    logprobs=chat_logprobs(c.logprobs),
                    native_finish_reason=native_finish(c.note),
                )
            )
        return ChatCompletion(
            id=job.id,
            created=job.created,
            model=job.model_name,
            system_fingerprint=FINGERPRINT,
            choices=choices,
            usage=job.usage,
        )

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        """Stream chunks as dicts; an engine failure becomes a final {"error": ...} event.

        Chunks are plain dicts in the shape of `ChatCompletionChunk` (dumped without
        None fields), built directly: this runs once per token per stream.
        """
        job = self.job
        job.record.streamed = True
        head = {
            "id": job.id,
            "object": "chat.completion.chunk",
            "created": job.created,
            "model": job.model_name,
            "system_fingerprint": FINGERPRINT,
        }
        splits = [self._tool_stream() for _ in range(job.n)]
        # One choice per chunk: many clients (SillyTavern among them) read only
        # choices[0] of each chunk, and would lose the other choices' text.
        for i in range(job.n):
            opening = {"role": "assistant", "content": ""}
            yield {**head, "choices": [{"index": i, "delta": opening, "finish_reason": None}]}
        try:
            async for outputs in job.steps():
                for o in outputs:
                    choice = self._chunk_choice(o, splits[o.index])
                    if choice is not None:
                        yield {**head, "choices": [choice]}
        except EngineError as exc:
            yield exc.to_body()
            return
        yield {**head, "choices": [], "usage": job.usage.model_dump()}

    @staticmethod
    def _chunk_choice(o: SeqOutput, split: ToolCallStream | None) -> dict[str, Any] | None:
        text = split.push(o.text) if split is not None else o.text
        delta: dict[str, Any] = {"content": text} if text else {}
        finish: str | None = o.finish_reason
        if finish is not None and split is not None:
            rest = split.finish()
            if rest:
                delta["content"] = delta.get("content", "") + rest
            if split.calls:
                delta["tool_calls"] = [
                    {"index": k, **c.model_dump()} for k, c in enumerate(split.calls)
                ]
                finish = "tool_calls"
        if not (delta or finish or o.logprobs):
            return None
        # The key is always there (null until the last chunk), as OpenAI's schema has it.
        choice: dict[str, Any] = {"index": o.index, "delta": delta, "finish_reason": finish}
        if o.note is not None:
            choice["native_finish_reason"] = native_finish(o.note)
        lp = chat_logprobs(o.logprobs)
        if lp is not None:
            choice["logprobs"] = lp.model_dump(exclude_none=True)
        return choice


class ChatService:
    def __init__(self, jobs: JobFactory, completions: CompletionService) -> None:
        self.jobs = jobs
        self.completions = completions

    async def start(
        self, request: ChatCompletionRequest, caller: Caller
    ) -> ChatJob | CompletionJob:
        """Check everything that can fail up front, then queue the request in the engine.

        A `prompt` without `messages` (OpenRouter's text completion on its chat route)
        is a text completion answered in the chat route's names.
        """
        if request.messages is None:
            return await self.completions.start(as_completion(request), caller, chat_shape=True)
        served, name = await self.jobs.pick_model(request)
        request, overridden = self.jobs.with_presets(request, served)
        # Rendering, tokenizing and compiling a grammar or a ban list can take a while
        # for a large request: off the event loop, so other requests' streams keep flowing.
        (template, tools, grammar, prompt), bans = await asyncio.to_thread(
            lambda: (self._prepare(served, request), self.jobs.bans(request, served))
        )
        job = self.jobs.submit(
            request,
            Submission(
                served=served,
                model_name=name,
                prompt_tokens=prompt.tokens,
                template_stops=template.stop,
                grammar=grammar,
                render_special=tools is not None and tools.parse,
                ignored=tuple(overridden),
                bans=bans,
            ),
            caller,
        )
        return ChatJob(job, tools)

    def _prepare(
        self, served: ServedModel, request: ChatCompletionRequest
    ) -> tuple[ChatTemplate, ToolPlan | None, str | None, Prompt]:
        template = served.template
        if request.template:
            template = self.jobs.models.template(served.spec, served.engine, request.template)
        tools = plan_tools(request.tools, request.tool_choice, template)
        grammar, param = requested_grammar(request)
        if tools is not None and tools.grammar is not None:
            if grammar is not None:
                raise BadRequestError(
                    f"{param} cannot be combined with a forced tool_choice", param=param
                )
            grammar, param = tools.grammar, "tools"
        if grammar is not None:
            check_grammar(served.engine, grammar, param)
        return template, tools, grammar, self._prompt(served, template, request, tools)

    def _prompt(
        self,
        served: ServedModel,
        template: ChatTemplate,
        request: ChatCompletionRequest,
        tools: ToolPlan | None,
    ) -> Prompt:
        """The rendered prompt; shortened by middle-out when it would not fit.

        A text too long to fit whatever its tokens (more bytes than the context times the
        longest token) is never tokenized whole: without middle-out it is a 400 at once;
        with it, messages are first dropped by byte length, then by tokens.
        """
        engine = served.engine
        n_ctx = engine.info.n_ctx
        limit = byte_limit(engine)
        assert request.messages is not None  # a prompt alone goes to CompletionService
        messages = request.messages
        text, prefill = render_prompt(engine, template, messages, tools)
        if len(text.encode("utf-8")) > limit:
            if not middle_out_enabled(request.transforms):
                raise ContextLengthError(
                    f"the prompt is far longer than this model's context of {n_ctx} tokens",
                    param="messages",
                )

            def fits_bytes(msgs: list[ChatMessage]) -> bool:
                rendered, _ = render_prompt(engine, template, msgs, tools)
                return len(rendered.encode("utf-8")) <= limit

            messages = middle_out(messages, fits_bytes) or messages
            text, prefill = render_prompt(engine, template, messages, tools)
        prompt = Prompt(text, tokenize_prompt(engine, text), prefill)
        budget = n_ctx - (request.requested_max_tokens or 1)
        if len(prompt.tokens) <= budget or not middle_out_enabled(request.transforms):
            return prompt  # the job factory reports a prompt that does not fit

        def fits(msgs: list[ChatMessage]) -> bool:
            return len(build_prompt(engine, template, msgs, tools).tokens) <= budget

        kept = middle_out(messages, fits)
        if kept is None:
            return prompt  # cannot fit: the job factory reports exactly why
        return build_prompt(engine, template, kept, tools)


def as_completion(request: ChatCompletionRequest) -> CompletionRequest:
    """A chat request that carries a `prompt` instead of messages, as a text completion.

    Chat's `logprobs: true` + `top_logprobs: k` become the legacy count `k`; `tools`,
    `tool_choice` and `template` have no meaning without messages and are reported.
    """
    fields: dict[str, Any] = {}
    for name in ("tools", "tool_choice", "template"):
        if getattr(request, name) is not None:
            fields[name] = True  # unknown to completions: listed as ignored
    if request.logprobs:
        fields["logprobs"] = request.top_logprobs or 0
    exclude = {"messages", "logprobs", "top_logprobs", "tools", "tool_choice", "template"}
    return completion_from(request, exclude, **fields)
