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
from server.serving.reasoning import (
    ReasoningPlan,
    ReasoningSplitter,
    budget_for,
    reasoning_format,
    starts_inside,
    thinks,
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


@dataclass(slots=True)
class ChatPiece:
    """One choice's share of one engine step, split into thinking, answer and calls.

    Every engine output gives one piece, even an empty one (with `announce`, the first
    comes when the request is admitted, before its prefill: usage then holds the prompt
    counts)."""

    index: int
    content: str = ""
    reasoning: str = ""
    finish: str | None = None  # OpenAI's finish_reason ("tool_calls" when calls)
    calls: list[ToolCall] | None = None
    note: str | None = None
    stop_string: str | None = None
    logprobs: list[EngineLogprob] | None = None


class _Split:
    """One choice's text: thinking split off first, then tool calls from the answer."""

    def __init__(self, reasoning: ReasoningPlan | None, tools: ToolPlan | None) -> None:
        self.thinking = (
            ReasoningSplitter(reasoning.fmt, reasoning.inside) if reasoning is not None else None
        )
        self.tools = ToolCallStream(tools.fmt, tools.prefill) if tools and tools.parse else None

    def piece(self, o: SeqOutput) -> ChatPiece:
        reasoning, content = ("", o.text) if self.thinking is None else self.thinking.push(o.text)
        if self.tools is not None and content:
            content = self.tools.push(content)
        p = ChatPiece(
            o.index,
            content,
            reasoning,
            o.finish_reason,
            note=o.note,
            stop_string=o.stop_string,
            logprobs=o.logprobs,
        )
        if o.finish_reason is not None:
            self._finish(p)
        return p

    def _finish(self, p: ChatPiece) -> None:
        if self.thinking is not None:
            reasoning, rest = self.thinking.finish()
            p.reasoning += reasoning
            if self.tools is not None and rest:
                rest = self.tools.push(rest)
            p.content += rest
        if self.tools is not None:
            p.content += self.tools.finish()
            if self.tools.calls:
                p.calls, p.finish = self.tools.calls, "tool_calls"


@dataclass
class ChatJob:
    job: Job
    tools: ToolPlan | None
    reasoning: ReasoningPlan | None = None

    @property
    def ignored(self) -> list[str]:
        return self.job.ignored

    @property
    def shows_reasoning(self) -> bool:
        return self.reasoning is not None and not self.reasoning.exclude

    def cancel(self) -> None:
        self.job.handle.cancel()

    async def pieces(self) -> AsyncIterator[ChatPiece]:
        """The reply as pieces, step by step; an engine failure raises EngineError."""
        splits = [_Split(self.reasoning, self.tools) for _ in range(self.job.n)]
        async for outputs in self.job.steps():
            for o in outputs:
                yield splits[o.index].piece(o)

    async def complete(self) -> ChatCompletion:
        job = self.job
        n = job.n
        content = [""] * n
        reasoning = [""] * n
        calls: list[list[ToolCall] | None] = [None] * n
        finish: list[str | None] = [None] * n
        notes: list[str | None] = [None] * n
        logprobs: list[list[EngineLogprob] | None] = [None] * n
        async for p in self.pieces():
            i = p.index
            content[i] += p.content
            reasoning[i] += p.reasoning
            if p.logprobs is not None:
                logprobs[i] = (logprobs[i] or []) + p.logprobs
            if p.finish is not None:
                finish[i], calls[i] = p.finish, p.calls
            notes[i] = p.note or notes[i]
        show = self.shows_reasoning
        choices = [
            ChatChoice(
                index=i,
                message=ResponseMessage(
                    content=content[i] or (None if calls[i] else ""),
                    reasoning=(reasoning[i] or None) if show else None,
                    reasoning_content=(reasoning[i] or None) if show else None,
                    tool_calls=calls[i],
                ),
                finish_reason=finish[i],
                logprobs=chat_logprobs(logprobs[i]),
                native_finish_reason=native_finish(notes[i]),
            )
            for i in range(n)
        ]
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
        # One choice per chunk: many clients (SillyTavern among them) read only
        # choices[0] of each chunk, and would lose the other choices' text.
        for i in range(job.n):
            opening = {"role": "assistant", "content": ""}
            yield {**head, "choices": [{"index": i, "delta": opening, "finish_reason": None}]}
        show = self.shows_reasoning
        try:
            async for p in self.pieces():
                choice = _chunk_choice(p, show)
                if choice is not None:
                    yield {**head, "choices": [choice]}
        except EngineError as exc:
            yield exc.to_body()
            return
        yield {**head, "choices": [], "usage": job.usage.model_dump()}


def _chunk_choice(p: ChatPiece, show_reasoning: bool) -> dict[str, Any] | None:
    delta: dict[str, Any] = {"content": p.content} if p.content else {}
    if p.reasoning and show_reasoning:
        # OpenRouter's name and DeepSeek's: frontends read one or the other.
        delta["reasoning"] = delta["reasoning_content"] = p.reasoning
    if p.calls:
        delta["tool_calls"] = [{"index": k, **c.model_dump()} for k, c in enumerate(p.calls)]
    if not (delta or p.finish or p.logprobs):
        return None
    # The key is always there (null until the last chunk), as OpenAI's schema has it.
    choice: dict[str, Any] = {"index": p.index, "delta": delta, "finish_reason": p.finish}
    if p.note is not None:
        choice["native_finish_reason"] = native_finish(p.note)
    lp = chat_logprobs(p.logprobs)
    if lp is not None:
        choice["logprobs"] = lp.model_dump(exclude_none=True)
    return choice


class ChatService:
    def __init__(self, jobs: JobFactory, completions: CompletionService) -> None:
        self.jobs = jobs
        self.completions = completions

    async def start(
        self,
        request: ChatCompletionRequest,
        caller: Caller,
        *,
        cap_max_tokens: bool = False,
        announce: bool = False,
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
        (template, tools, grammar, prompt, reasoning), bans = await asyncio.to_thread(
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
                render_special=(tools is not None and tools.parse) or thinks(template),
                ignored=tuple(overridden),
                bans=bans,
                thinking=reasoning.engine_budget(served.engine),
                cap_max_tokens=cap_max_tokens,
                announce=announce,
            ),
            caller,
        )
        return ChatJob(job, tools, reasoning)

    async def prompt_tokens(self, request: ChatCompletionRequest) -> list[int]:
        """The prompt's tokens, rendered and tokenized exactly as for a reply."""
        if request.messages is None:
            raise BadRequestError("messages are required", param="messages")
        served, _ = await self.jobs.pick_model(request)
        request, _ = self.jobs.with_presets(request, served)
        prepared = await asyncio.to_thread(self._prepare, served, request)
        return prepared[3].tokens

    def _prepare(
        self, served: ServedModel, request: ChatCompletionRequest
    ) -> tuple[ChatTemplate, ToolPlan | None, str | None, Prompt, ReasoningPlan]:
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
        enabled, effort, tokens, exclude = reasoning_options(request)
        extra: dict[str, Any] = dict(request.chat_template_kwargs or {})
        if enabled is False:
            extra["enable_thinking"] = False  # Qwen3's and GLM's switch, where there is one
        prompt = self._prompt(served, template, request, tools, extra)
        fmt = reasoning_format(template)
        reasoning = ReasoningPlan(
            fmt,
            starts_inside(prompt.text, prompt.prefill, fmt),
            exclude,
            budget_for(enabled, effort, request.requested_max_tokens, tokens),
        )
        return template, tools, grammar, prompt, reasoning

    def _prompt(
        self,
        served: ServedModel,
        template: ChatTemplate,
        request: ChatCompletionRequest,
        tools: ToolPlan | None,
        extra: dict[str, Any],
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
        text, prefill = render_prompt(engine, template, messages, tools, extra)
        if len(text.encode("utf-8")) > limit:
            if not middle_out_enabled(request.transforms):
                raise ContextLengthError(
                    f"the prompt is far longer than this model's context of {n_ctx} tokens",
                    param="messages",
                )

            def fits_bytes(msgs: list[ChatMessage]) -> bool:
                rendered, _ = render_prompt(engine, template, msgs, tools, extra)
                return len(rendered.encode("utf-8")) <= limit

            messages = middle_out(messages, fits_bytes) or messages
            text, prefill = render_prompt(engine, template, messages, tools, extra)
        prompt = Prompt(text, tokenize_prompt(engine, text), prefill)
        budget = n_ctx - (request.requested_max_tokens or 1)
        if len(prompt.tokens) <= budget or not middle_out_enabled(request.transforms):
            return prompt  # the job factory reports a prompt that does not fit

        def fits(msgs: list[ChatMessage]) -> bool:
            return len(build_prompt(engine, template, msgs, tools, extra).tokens) <= budget

        kept = middle_out(messages, fits)
        if kept is None:
            return prompt  # cannot fit: the job factory reports exactly why
        return build_prompt(engine, template, kept, tools, extra)


def reasoning_options(
    request: ChatCompletionRequest,
) -> tuple[bool | None, str | None, int | None, bool]:
    """(enabled, effort, budget tokens, exclude) from OpenRouter's `reasoning`, its older
    `include_reasoning`, OpenAI's `reasoning_effort` and llama-server's enable_thinking."""
    r = request.reasoning
    enabled = r.enabled if r is not None else None
    if (request.chat_template_kwargs or {}).get("enable_thinking") is False:
        enabled = False
    effort = (r.effort if r is not None else None) or request.reasoning_effort
    exclude = (r is not None and r.exclude) or request.include_reasoning is False
    return enabled, effort, r.max_tokens if r is not None else None, exclude


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
    for name in ("reasoning", "include_reasoning", "reasoning_effort", "chat_template_kwargs"):
        if getattr(request, name) is not None:
            fields[name] = True  # text completions keep the tags verbatim: reported
            exclude.add(name)
    return completion_from(request, exclude, **fields)
