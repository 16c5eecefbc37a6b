"""`GET /metrics` in Prometheus' text format (prometheus-client), one registry per app.

Counted as they happen: requests by route and status (an ASGI wrapper), tokens and
latencies of finished generations and prompt-cache lookups per model (a GenerationLog
listener). Read when scraped: queue depth, busy slots, KV cache usage, engine counters
(prompt-cache tiers, speculation), model loads. The gauges a router schedules on are
also exported under vLLM's names (`vllm:num_requests_waiting`, `vllm:num_requests_running`,
`vllm:kv_cache_usage_perc`), which llm-d's endpoint picker and SMG read by default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Load:
    """What a router reads of one model: requests running and waiting, and how full its
    KV cache is. KV usage counts the cells of busy slots only: an idle slot's cached
    prefix is given up for any new request (vLLM's `kv_cache_usage_perc` the same way)."""

    running: int
    waiting: int
    slots: int
    kv_tokens: int
    kv_capacity: int
    tok_s: float

    @property
    def kv_usage(self) -> float:
        return self.kv_tokens / self.kv_capacity if self.kv_capacity else 0.0


def load_of(health: dict[str, Any]) -> Load:
    slot_list = health.get("slot_list") or []
    busy = [s for s in slot_list if s.get("busy")]
    return Load(
        running=int(health.get("slots_busy", 0)),
        waiting=int(health.get("queued", 0)),
        slots=int(health.get("slots", 0)),
        kv_tokens=sum(int(s.get("tokens", 0)) for s in busy),
        kv_capacity=int(health.get("n_ctx", 0)),
        tok_s=sum(float(s.get("tok_s") or 0.0) for s in busy),
    )


@dataclass
class PrefixCache:
    """Prompt tokens looked up in one model's prompt cache, and how many it had."""

    queries: int = 0
    hits: int = 0


class _EngineCollector(Collector):
    """Gauges and counters read from the loaded engines at scrape time; each router gauge
    also under the vLLM name the routers read by default (label `model_name`)."""

    def __init__(
        self, pool: Callable[[], ModelPool | None], prefix: dict[str, PrefixCache]
    ) -> None:
        self._pool = pool
        self._prefix = prefix

    def collect(self) -> Iterator[Metric]:
        pool = self._pool()
        queued = GaugeMetricFamily("hostler_queue_depth", "Requests waiting", labels=["model"])
        busy = GaugeMetricFamily("hostler_slots_busy", "Slots generating", labels=["model"])
        slots = GaugeMetricFamily("hostler_slots", "Slots per model", labels=["model"])
        kv = GaugeMetricFamily(
            "hostler_kv_cache_usage_ratio",
            "KV cache cells held by running requests, 0 to 1",
            labels=["model"],
        )
        kv_cap = GaugeMetricFamily(
            "hostler_kv_cache_capacity_tokens", "KV cache cells per model", labels=["model"]
        )
        v_running = GaugeMetricFamily(
            "vllm:num_requests_running",
            "Requests running (hostler_slots_busy)",
            labels=["model_name"],
        )
        v_waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting",
            "Requests waiting (hostler_queue_depth)",
            labels=["model_name"],
        )
        v_kv = [
            GaugeMetricFamily(
                name, "KV cache usage, 0 to 1 (hostler_kv_cache_usage_ratio)", labels=["model_name"]
            )
            for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
        ]
        counters: dict[str, CounterMetricFamily] = {}
        loads = CounterMetricFamily("hostler_model_loads", "Models loaded since start")
        loads.add_metric([], pool.loads if pool else 0)
        for name, engine in (pool.loaded if pool else {}).items():
            h = engine.health()
            load = load_of(h)
            queued.add_metric([name], load.waiting)
            busy.add_metric([name], load.running)
            slots.add_metric([name], load.slots)
            if not h.get("pooling"):  # a chat model: its KV cache, under the router names
                kv.add_metric([name], load.kv_usage)
                kv_cap.add_metric([name], load.kv_capacity)
                v_running.add_metric([name], load.running)
                v_waiting.add_metric([name], load.waiting)
                for gauge in v_kv:
                    gauge.add_metric([name], load.kv_usage)
            for key, value in _flat(h.get("cache") or {}, "cache_").items():
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
        yield from (queued, busy, slots, kv, kv_cap, loads, *counters.values())
        yield from self._prefix_counters()
        yield from (v_running, v_waiting, *v_kv)

    def _prefix_counters(self) -> Iterator[Metric]:
        """Prompt tokens looked up and found in the prompt cache, per model, since start:
        a router's prefix affinity shows as hits/queries (vLLM's prefix_cache_* too)."""
        for prefix, label in (("hostler_", "model"), ("vllm:", "model_name")):
            queries = CounterMetricFamily(
                f"{prefix}prefix_cache_queries",
                "Prompt tokens looked up in the prompt cache",
                labels=[label],
            )
            hits = CounterMetricFamily(
                f"{prefix}prefix_cache_hits",
                "Prompt tokens found in the prompt cache",
                labels=[label],
            )
            for model, seen in sorted(self._prefix.items()):
                queries.add_metric([model], seen.queries)
                hits.add_metric([model], seen.hits)
            yield queries
            yield hits


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
        self.prefix: dict[str, PrefixCache] = {}
        r.register(_EngineCollector(pool, self.prefix))

    def generation(self, rec: GenerationRecord) -> None:
        if rec.tokens_prompt:
            seen = self.prefix.setdefault(rec.model, PrefixCache())
            seen.queries += rec.tokens_prompt
            seen.hits += min(rec.cached_tokens, rec.tokens_prompt)
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
