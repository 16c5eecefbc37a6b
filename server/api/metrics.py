"""`GET /metrics` in Prometheus' text format (prometheus-client), one registry per app.

Counted as they happen: requests by route and status (an ASGI wrapper), tokens and
latencies of finished generations (a GenerationLog listener). Read when scraped: queue
depth, busy slots, engine counters (prompt-cache hits), model loads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.engine.pool import ModelPool
from server.serving.generations import GenerationRecord

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1)


class _EngineCollector(Collector):
    """Gauges and counters read from the loaded engines at scrape time."""

    def __init__(self, pool: Callable[[], ModelPool | None]) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        pool = self._pool()
        queued = GaugeMetricFamily("hostler_queue_depth", "Requests waiting", labels=["model"])
        busy = GaugeMetricFamily("hostler_slots_busy", "Slots generating", labels=["model"])
        slots = GaugeMetricFamily("hostler_slots", "Slots per model", labels=["model"])
        counters: dict[str, CounterMetricFamily] = {}
        loads = CounterMetricFamily("hostler_model_loads", "Models loaded since start")
        loads.add_metric([], pool.loads if pool else 0)
        for name, engine in (pool.loaded if pool else {}).items():
            h = engine.health()
            queued.add_metric([name], h.get("queued", 0))
            busy.add_metric([name], h.get("slots_busy", 0))
            slots.add_metric([name], h.get("slots", 0))
            for key, value in _flat(h.get("cache", {}), "cache_").items():
                fam = counters.setdefault(
                    key,
                    CounterMetricFamily(f"hostler_{key}", f"Prompt cache: {key}", labels=["model"]),
                )
                fam.add_metric([name], value)
            if "draft_tokens" in h:  # a chat model: its n-gram speculation
                for key, what in (("draft_tokens", "drafted"), ("draft_accepted", "accepted")):
                    fam = counters.setdefault(
                        key,
                        CounterMetricFamily(
                            f"hostler_speculative_{what}_tokens",
                            f"Speculation: tokens {what}",
                            labels=["model"],
                        ),
                    )
                    fam.add_metric([name], h.get(key, 0))
            if h.get("pooling"):  # an embedding model: what it has embedded
                for key in ("inputs", "tokens", "batches"):
                    fam = counters.setdefault(
                        f"embedding_{key}",
                        CounterMetricFamily(
                            f"hostler_embedding_{key}", f"Embedding {key}", labels=["model"]
                        ),
                    )
                    fam.add_metric([name], h.get(key, 0))
        yield from (queued, busy, slots, loads, *counters.values())


def _flat(d: dict[str, Any], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}_"))
        elif isinstance(v, int | float) and k in ("hits", "saves", "restores", "evictions"):
            out[f"{prefix}{k}"] = v
    return out


class Metrics:
    def __init__(self, pool: Callable[[], ModelPool | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "hostler_requests", "HTTP requests", ["route", "status"], registry=r
        )
        self.tokens = Counter("hostler_tokens", "Tokens processed", ["kind"], registry=r)
        self.ttft = Histogram(
            "hostler_time_to_first_token_seconds",
            "Seconds from request to first output",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.per_token = Histogram(
            "hostler_time_per_output_token_seconds",
            "Seconds per generated token after the first",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(pool))

    def generation(self, rec: GenerationRecord) -> None:
        self.tokens.labels("prompt").inc(rec.tokens_prompt)
        self.tokens.labels("cached").inc(rec.cached_tokens)
        self.tokens.labels("completion").inc(rec.tokens_completion)
        if rec.latency is not None:
            self.ttft.observe(rec.latency)
            if rec.tokens_completion > 1:
                decode = max(rec.generation_time - rec.latency, 0.0)
                self.per_token.observe(decode / (rec.tokens_completion - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CountRequests:
    """ASGI wrapper: count each HTTP response by its route template and status."""

    def __init__(self, app: ASGIApp, metrics: Callable[[], Metrics | None]) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            metrics = self.metrics()
            if metrics is not None:
                route = scope.get("route")
                if route is None:
                    path = "unmatched"  # refused before routing, or no such route
                elif scope.get("path_params"):
                    path = getattr(scope.get("effective_route_context"), "path", route.path)
                else:
                    path = scope["path"]  # a fixed path: the template itself
                metrics.requests.labels(path, str(status or 499)).inc()
