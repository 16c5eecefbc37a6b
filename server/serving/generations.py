"""Stats of completed generations, for OpenRouter's `GET /api/v1/generation?id=`."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any


@dataclass
class GenerationRecord:
    id: str
    model: str
    referer: str | None = None
    title: str | None = None
    route: str | None = None
    """The HTTP path it came by (the status page's last requests)."""
    streamed: bool = False
    started: float = field(default_factory=time.monotonic)
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    tokens_prompt: int = 0
    tokens_completion: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    generation_time: float = 0.0
    latency: float | None = None
    """Seconds from the request to its first output (time to first token)."""
    drafted: int = 0
    accepted: int = 0
    """Speculation: tokens drafted from n-grams, and how many of them were kept."""

    def first_output(self) -> None:
        self.latency = time.monotonic() - self.started

    def finish(
        self,
        prompt: int,
        completion: int,
        cached: int,
        reason: str,
        drafted: int = 0,
        accepted: int = 0,
    ) -> None:
        self.drafted, self.accepted = drafted, accepted
        self.tokens_prompt = prompt
        self.tokens_completion = completion
        self.cached_tokens = cached
        self.finish_reason = reason
        self.generation_time = time.monotonic() - self.started

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("started")
        d.pop("route")
        d.update(
            native_tokens_prompt=self.tokens_prompt,
            native_tokens_completion=self.tokens_completion,
            native_tokens_cached=self.cached_tokens,
            latency=round((self.latency or self.generation_time) * 1000),
            generation_time=round(self.generation_time * 1000),
            origin=self.referer,
            app_title=self.title,
            total_cost=0,
            speculative={
                "drafted_tokens": self.drafted,
                "accepted_tokens": self.accepted,
                "acceptance": round(self.accepted / self.drafted, 3) if self.drafted else None,
            },
        )
        d.pop("drafted")
        d.pop("accepted")
        return d


class GenerationLog:
    """The most recent `capacity` completed generations, by id."""

    def __init__(self, capacity: int = 1000) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, GenerationRecord] = OrderedDict()
        self.listeners: list[Callable[[GenerationRecord], None]] = []
        """Called with each finished generation (metrics)."""

    def add(self, record: GenerationRecord) -> None:
        for listener in self.listeners:
            listener(record)
        self._items[record.id] = record
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, gen_id: str) -> GenerationRecord | None:
        return self._items.get(gen_id)
