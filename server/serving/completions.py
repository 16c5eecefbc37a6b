"""The text completion use case: a raw prompt (no template) -> engine -> text.

A request may carry several prompts (OpenAI's batch form); each becomes its own job,
and choice `index` is `prompt_index * n + choice`, as in OpenAI's API.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from server.engine.types import SeqOutput
from server.engine.types import TokenLogprob as EngineLogprob
from server.errors import BadRequestError, ContextLengthError, EngineError
from server.protocol.common import PromptTokensDetails, Usage
from server.protocol.completions import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
)
from server.serving.job import FINGERPRINT, Caller, Job, JobFactory, Submission, native_finish
from server.serving.models import ServedModel
from server.serving.prompt import byte_limit, clip_middle, tokenize_prompt
from server.serving.structured import check_grammar, requested_grammar
from server.serving.transforms import middle_out_enabled, middle_out_tokens


def completion_logprobs(
    items: list[EngineLogprob] | None, offset: int = 0
) -> CompletionLogprobs | None:
    """The legacy logprobs shape: parallel lists, top alternatives as {token: logprob}."""
    if items is None:
        return None
    out = CompletionLogprobs()
    for lp in items:
        out.tokens.append(lp.token)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({t: v for t, v, _ in lp.top})
        out.text_offset.append(offset)
        offset += len(lp.token)
    return out


def _sum_usage(jobs: list[Job]) -> Usage:
    usages = [j.usage for j in jobs]
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(
            cached_tokens=sum(u.prompt_tokens_details.cached_tokens for u in usages)
        ),
    )


@dataclass
class CompletionJob:
    jobs: list[Job]
    echoes: list[str]  # per prompt: the prompt text when `echo`, else ""
    chat_shape: bool = False  # OpenRouter's `prompt` on the chat route: named as chat

    @property
    def ignored(self) -> list[str]:
        return self.jobs[0].ignored

    def cancel(self) -> None:
        for job in self.jobs:
            job.handle.cancel()

    @property
    def usage(self) -> Usage:
        return _sum_usage(self.jobs)

    @property
    def _first(self) -> Job:
        return self.jobs[0]

    async def complete(self) -> Completion:
        results = await asyncio.gather(*(j.collect() for j in self.jobs))
        choices = []
        for p, (job, collected) in enumerate(zip(self.jobs, results, strict=True)):
            echo = self.echoes[p]
            for i, c in enumerate(collected):
                choices.append(
                    CompletionChoice(
                        index=p * job.n + i,
                        text=echo + c.text,
                        finish_reason=c.finish_reason,
                        logprobs=completion_logprobs(c.logprobs, len(echo)),
                        native_finish_reason=native_finish(c.note),
                    )
                )
        return self._body(choices, _sum_usage(self.jobs))

    def _body(
        self, choices: list[CompletionChoice], usage: Usage | None, *, chunk: bool = False
    ) -> Completion:
        """The response, or one stream chunk (the same object, as in OpenAI's API)."""
        first = self._first
        name = "text_completion"
        if self.chat_shape:
            name = "chat.completion.chunk" if chunk else "chat.completion"
        return Completion(
            object=name,
            id=first.id,
            created=first.created,
            model=first.model_name,
            system_fingerprint=FINGERPRINT,
            choices=choices,
            usage=usage,
        )

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        offsets = [0] * sum(j.n for j in self.jobs)

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> dict[str, Any]:
            body = self._body(choices, usage, chunk=True).model_dump(exclude_none=True)
            for c, dumped in zip(choices, body["choices"], strict=True):
                dumped["finish_reason"] = c.finish_reason  # null until the last, as OpenAI's
            return body

        def choice(p: int, o: SeqOutput) -> CompletionChoice:
            index = p * self.jobs[p].n + o.index
            lp = completion_logprobs(o.logprobs, offsets[index])
            offsets[index] += len(o.text)
            return CompletionChoice(
                index=index,
                text=o.text,
                finish_reason=o.finish_reason,
                logprobs=lp,
                native_finish_reason=native_finish(o.note),
            )

        for p, echo in enumerate(self.echoes):
            if echo:
                n = self.jobs[p].n
                for i in range(n):
                    yield chunk([CompletionChoice(index=p * n + i, text=echo)])
                for i in range(n):
                    offsets[p * n + i] = len(echo)
        try:
            async for p, outputs in _merge(self.jobs):
                # One choice per chunk: clients that read only choices[0] see every one.
                for o in outputs:
                    if o.text or o.finish_reason or o.logprobs:
                        yield chunk([choice(p, o)])
        except EngineError as exc:
            yield exc.to_body()
            return
        yield chunk([], _sum_usage(self.jobs))


async def _merge(jobs: list[Job]) -> AsyncIterator[tuple[int, list[SeqOutput]]]:
    """The step outputs of several jobs, interleaved as they come, tagged with the job."""
    if len(jobs) == 1:
        async for outputs in jobs[0].steps():
            yield 0, outputs
        return
    queue: asyncio.Queue[tuple[int, list[SeqOutput] | BaseException | None]] = asyncio.Queue()

    async def pump(p: int, job: Job) -> None:
        try:
            async for outputs in job.steps():
                await queue.put((p, outputs))
            await queue.put((p, None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            await queue.put((p, exc))

    tasks = [asyncio.ensure_future(pump(p, j)) for p, j in enumerate(jobs)]
    try:
        running = len(tasks)
        while running:
            p, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield p, item
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t


class CompletionService:
    def __init__(self, jobs: JobFactory) -> None:
        self.jobs = jobs

    async def start(
        self, request: CompletionRequest, caller: Caller, *, chat_shape: bool = False
    ) -> CompletionJob:
        served, name = await self.jobs.pick_model(request)
        request, ignored = self.jobs.with_presets(request, served)
        # Tokenizing large prompts, compiling a grammar or a ban list: off the event loop.
        (grammar, prompts), bans = await asyncio.to_thread(
            lambda: (self._prepare(served, request), self.jobs.bans(request, served))
        )
        if request.suffix is not None:
            ignored.append("suffix")  # no infill: the text after the gap is not used
        if request.best_of not in (None, request.n):
            ignored.append("best_of")
        jobs: list[Job] = []
        try:
            # Budget every prompt before queueing any, so a bad one fails the request.
            budgets = [self.jobs.max_tokens(served, request, len(t), "prompt") for t in prompts]
            for tokens, budget in zip(prompts, budgets, strict=True):
                jobs.append(
                    self.jobs.submit(
                        request,
                        Submission(
                            served=served,
                            model_name=name,
                            prompt_tokens=tokens,
                            grammar=grammar,
                            ignored=tuple(ignored),
                            prompt_param="prompt",
                            max_tokens=budget,
                            bans=bans,
                        ),
                        caller,
                    )
                )
        except BaseException:
            for job in jobs:
                job.handle.cancel()
            raise
        echoes = [self._echo(served, p) if request.echo else "" for p in request.prompts]
        return CompletionJob(jobs, echoes, chat_shape)

    def _prepare(
        self, served: ServedModel, request: CompletionRequest
    ) -> tuple[str | None, list[list[int]]]:
        grammar, param = requested_grammar(request)
        if grammar is not None:
            check_grammar(served.engine, grammar, param)
        trim = middle_out_enabled(request.transforms)
        prompts = [self._tokens(served, p, trim) for p in request.prompts]
        if trim:
            budget = served.engine.info.n_ctx - (request.requested_max_tokens or 1)
            if budget >= 1:  # else max_tokens alone is too large: reported with the real count
                prompts = [middle_out_tokens(t, budget) for t in prompts]
        return grammar, prompts

    @staticmethod
    def _tokens(served: ServedModel, prompt: str | list[int], trim: bool) -> list[int]:
        engine = served.engine
        if isinstance(prompt, str):
            limit = byte_limit(engine)
            if len(prompt.encode("utf-8")) > limit:
                if not trim:
                    raise ContextLengthError(
                        "the prompt is far longer than this model's context of"
                        f" {engine.info.n_ctx} tokens",
                        param="prompt",
                    )
                prompt = clip_middle(prompt, limit)  # middle-out cuts the middle anyway
            return tokenize_prompt(engine, prompt)
        n_vocab = engine.info.n_vocab
        bad = [t for t in prompt if not 0 <= t < n_vocab]
        if bad:
            raise BadRequestError(
                f"prompt: token id {bad[0]} is outside the vocabulary (0..{n_vocab - 1})",
                param="prompt",
            )
        return prompt

    @staticmethod
    def _echo(served: ServedModel, prompt: str | list[int]) -> str:
        if isinstance(prompt, str):
            return prompt
        return "".join(served.engine.token_text(t) for t in prompt)
