"""A request queued in the engine, and how a request becomes one.

Chat and text completions share everything between "the prompt is tokenized" and
"the engine's outputs are folded into choices": model choice with fallbacks, the
context budget, sampling parameters, stop strings, submission, usage and the
generation record. Only the wire shapes differ; those live in chat.py / completions.py.
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from server import __version__, durations
from server.engine.bans import BanList
from server.engine.thinking import ThinkingBudget
from server.engine.types import (
    Engine,
    GenerationHandle,
    GenerationRequest,
    SeqOutput,
    TokenLogprob,
)
from server.errors import (
    BadRequestError,
    ContextLengthError,
    EngineError,
    EngineGoneError,
    HostlerError,
    ModelLoadError,
    NotFoundError,
)
from server.protocol.common import PromptTokensDetails, SamplingFields, Usage
from server.serving.generations import GenerationLog, GenerationRecord
from server.serving.models import ModelService, ServedModel
from server.serving.params import banned_strings, ignored_params, to_sampling_params
from server.serving.presets import apply_presets, model_bans

FINGERPRINT = f"hostler-{__version__}"
R = TypeVar("R", bound=SamplingFields)

# Generation ids: unguessable enough for a local server, without a getrandom() syscall
# per request (which is slow on some VMs).
_ids = random.Random(secrets.randbits(128))


def new_generation_id() -> str:
    return f"gen-{_ids.getrandbits(96):024x}"


def native_finish(note: str | None) -> str | None:
    """OpenRouter's `native_finish_reason` for an engine note (None: nothing to add)."""
    if note is None:
        return None
    return note.split(":", 1)[0]


@dataclass(frozen=True)
class Caller:
    """Who sent a request: OpenRouter's attribution headers, and where its usage goes."""

    referer: str | None = None
    title: str | None = None
    route: str | None = None
    """The HTTP path the request came by (kept with its stats, never its text)."""
    on_usage: Callable[[int], None] | None = None
    """Called once with the job's total tokens (prompt + completion) when it ends."""


@dataclass
class Choice:
    """One choice, folded from all of its step outputs."""

    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    note: str | None = None


@dataclass
class _Totals:
    prompt: int = 0
    cached: int = 0
    completion: dict[int, int] = field(default_factory=dict)
    drafted: dict[int, tuple[int, int]] = field(default_factory=dict)

    def add(self, o: SeqOutput) -> None:
        self.prompt = max(self.prompt, o.prompt_tokens)
        self.cached = max(self.cached, o.cached_tokens)
        self.completion[o.index] = o.completion_tokens
        if o.drafted:
            self.drafted[o.index] = (o.drafted, o.accepted)

    def usage(self) -> Usage:
        completion = sum(self.completion.values())
        return Usage(
            prompt_tokens=self.prompt,
            completion_tokens=completion,
            total_tokens=self.prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached),
        )


@dataclass
class Job:
    """A request that passed every check and is queued in the engine."""

    id: str
    model_name: str
    served: ServedModel
    handle: GenerationHandle
    n: int
    ignored: list[str]
    record: GenerationRecord
    log: GenerationLog
    on_usage: Callable[[int], None] | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    _totals: _Totals = field(default_factory=_Totals)

    @property
    def usage(self) -> Usage:
        return self._totals.usage()

    async def steps(self) -> AsyncIterator[list[SeqOutput]]:
        """The engine's outputs step by step; an engine failure raises EngineError.

        However it ends (finished, failed, or abandoned by a client that left), the
        generation is recorded once, with the tokens it used.
        """
        finish: str | None = None
        first = True
        try:
            async for outputs in self.handle:
                if first and any(o.token_ids or o.finish_reason for o in outputs):
                    first = False  # not the admission output: that one comes before prefill
                    self.record.first_output()
                for o in outputs:
                    self._totals.add(o)
                    if o.error:
                        finish = "error"
                        if o.unavailable:
                            raise EngineGoneError(o.error, headers={"Retry-After": "1"})
                        raise EngineError(o.error)
                    if o.finish_reason and o.index == 0:
                        finish = o.finish_reason
                yield outputs
            finish = finish or "stop"
        finally:
            self._close(finish or "cancelled")

    async def collect(self) -> list[Choice]:
        """Run to the end; every choice's text, finish reason and logprobs."""
        choices = [Choice() for _ in range(self.n)]
        async for outputs in self.steps():
            for o in outputs:
                c = choices[o.index]
                c.text += o.text
                if o.logprobs is not None:
                    c.logprobs = (c.logprobs or []) + o.logprobs
                if o.finish_reason:
                    c.finish_reason = o.finish_reason
                c.note = o.note or c.note
        return choices

    def _close(self, finish: str) -> None:
        u = self.usage
        spec = self._totals.drafted.values()
        self.record.finish(
            u.prompt_tokens,
            u.completion_tokens,
            self._totals.cached,
            finish,
            drafted=sum(d for d, _ in spec),
            accepted=sum(a for _, a in spec),
        )
        self.log.add(self.record)
        if self.on_usage is not None:
            self.on_usage(u.total_tokens)


@dataclass(frozen=True)
class Submission:
    """What a use case hands the engine besides the request's own fields."""

    served: ServedModel
    model_name: str
    prompt_tokens: list[int]
    template_stops: tuple[str, ...] = ()
    grammar: str | None = None
    render_special: bool = False
    ignored: tuple[str, ...] = ()
    prompt_param: str = "messages"
    max_tokens: int | None = None  # the budget, when the caller has already checked it
    bans: BanList | None = None
    thinking: ThinkingBudget | None = None
    cap_max_tokens: bool = False  # max_tokens beyond the context is cut, not refused
    announce: bool = False  # an empty output on admission, before the prefill


class JobFactory:
    """Model choice (with OpenRouter fallbacks) and submission, shared by the endpoints."""

    def __init__(self, models: ModelService, log: GenerationLog) -> None:
        self.models = models
        self.log = log
        self._template_stops: dict[
            tuple[str, tuple[str, ...]], tuple[tuple[str, ...], frozenset[int]]
        ] = {}

    async def pick_model(self, request: SamplingFields) -> tuple[ServedModel, str]:
        names: list[str | None] = [request.model] if request.model else []
        names += [m for m in request.models or [] if m not in names]
        last: HostlerError | None = None
        for name in names or [None]:
            try:
                served = await self.models.get(name, chat=True)
                if request.keep_alive is not None:
                    self.models.pool.keep_alive(
                        served.spec.id, durations.seconds(request.keep_alive)
                    )
                # A fallback name (claude-*) answers with the model that really ran.
                shown = name if name and name in self.models.registry else served.spec.id
                return served, shown
            except (NotFoundError, ModelLoadError) as exc:
                last = exc  # try the next model of a fallback list
        assert last is not None
        raise last

    @staticmethod
    def with_presets(request: R, served: ServedModel) -> tuple[R, list[str]]:
        """The request as the model's presets make it (see serving/presets.py)."""
        return apply_presets(request, served.spec)

    @staticmethod
    def bans(request: SamplingFields, served: ServedModel) -> BanList | None:
        """The compiled banned phrases (request's and model's); slow the first time a
        long list is seen, so callers run it off the event loop."""
        return banned_strings(request.banned_strings, model_bans(served.spec))

    def max_tokens(
        self,
        served: ServedModel,
        request: SamplingFields,
        n_prompt: int,
        prompt_param: str,
        cap: bool = False,
    ) -> int:
        """The completion budget; a prompt (plus max_tokens) beyond the context is a 400.
        With `cap`, max_tokens is a ceiling (Anthropic's meaning), not a reservation."""
        n_ctx = served.engine.info.n_ctx
        if n_prompt >= n_ctx:
            raise ContextLengthError(
                f"the prompt is {n_prompt} tokens; this model's context is {n_ctx}",
                param=prompt_param,
                tokens=n_prompt,
                limit=n_ctx,
            )
        max_tokens = request.requested_max_tokens or served.spec.defaults.max_tokens
        if max_tokens is None:
            return n_ctx - n_prompt
        if cap:
            return min(max_tokens, n_ctx - n_prompt)
        if n_prompt + max_tokens > n_ctx:
            raise ContextLengthError(
                f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds this model's"
                f" context of {n_ctx} tokens",
                param="max_tokens",
                tokens=n_prompt + max_tokens,
                limit=n_ctx,
            )
        return max_tokens

    def submit(self, request: SamplingFields, sub: Submission, caller: Caller) -> Job:
        served = sub.served
        info = served.engine.info
        max_tokens = sub.max_tokens or self.max_tokens(
            served, request, len(sub.prompt_tokens), sub.prompt_param, sub.cap_max_tokens
        )
        params, dropped = to_sampling_params(
            request,
            served.spec.defaults,
            info.n_vocab,
            info.n_ctx,
            sub.grammar,
            lambda text: served.engine.tokenize(text, add_special=False),
        )
        stop_text, stop_ids = self._stops(served, request.stop_list, sub.template_stops)
        handle = served.engine.submit(
            GenerationRequest(
                prompt_tokens=sub.prompt_tokens,
                params=params,
                max_tokens=max_tokens,
                stop=stop_text,
                stop_token_ids=stop_ids,
                n=request.n,
                render_special=sub.render_special,
                bans=sub.bans,
                thinking=sub.thinking,
                speculative=request.speculative,
                announce=sub.announce,
            )
        )
        record = GenerationRecord(
            id=new_generation_id(),
            model=sub.model_name,
            referer=caller.referer,
            title=caller.title,
            route=caller.route,
        )
        ignored = ignored_params(request) + [p for p in sub.ignored if p] + dropped
        return Job(
            record.id,
            sub.model_name,
            served,
            handle,
            request.n,
            ignored,
            record,
            self.log,
            caller.on_usage,
        )

    def _stops(
        self, served: ServedModel, request_stops: list[str], template_stops: tuple[str, ...]
    ) -> tuple[tuple[str, ...], frozenset[int]]:
        """Split stops into text to match and single control tokens to end on."""
        if any(not s for s in request_stops):
            raise BadRequestError("stop sequences must not be empty", param="stop")
        key = (served.spec.id, template_stops)
        base = self._template_stops.get(key)
        if base is None:  # the template's part is the same for every request: once
            base = self._template_stops[key] = _split_stops(served.engine, template_stops)
        if not request_stops:
            return base
        text, ids = _split_stops(served.engine, tuple(request_stops))
        return tuple(dict.fromkeys((*text, *base[0]))), ids | base[1]


def _split_stops(engine: Engine, stops: tuple[str, ...]) -> tuple[tuple[str, ...], frozenset[int]]:
    """Stops that are one control token (e.g. `<|im_end|>`) end on that token id; the
    others are matched as text."""
    text: list[str] = []
    ids: set[int] = set()
    for s in stops:
        tokens = engine.tokenize(s, add_special=False)
        if len(tokens) == 1 and _is_control(s) and engine.token_text(tokens[0]) == s:
            ids.add(tokens[0])
        elif s not in text:
            text.append(s)
    return tuple(text), frozenset(ids)


def _is_control(s: str) -> bool:
    return (s.startswith("<") and s.endswith(">")) or (s.startswith("[") and s.endswith("]"))
