"""What the status page shows, as one JSON snapshot: every model and its state, each
loaded model's slots, queue and prompt-cache tiers, aggregate tok/s and TTFT over the
last minutes, and the last requests.

Nothing here holds a prompt, a completion or a key: slots and requests are counted in
tokens and seconds only. A snapshot is built at most once per `interval` however many
pages watch (`latest`), from what the engines already report (no round trip to an
engine process).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server import __version__
from server.engine.pool import resident_bytes
from server.errors import QueueFullError
from server.registry import local_file
from server.serving.downloads import Downloads
from server.serving.generations import GenerationLog, GenerationRecord
from server.serving.models import ModelService

SERIES_SECONDS = 300  # the plot's span: five minutes at one point a second
RECENT_REQUESTS = 20
MAX_FEEDS = 16  # live feeds open at once (a page holds one)


@dataclass(frozen=True)
class Point:
    """One second of the plot: tokens generated per second, and the mean time to first
    token of the requests that finished in it (None: none did)."""

    t: float
    tok_s: float
    ttft_ms: float | None


class StatusBoard:
    def __init__(
        self,
        models: ModelService,
        downloads: Downloads,
        generations: GenerationLog,
        *,
        key_required: Callable[[], bool],
        interval: float = 0.5,
    ) -> None:
        self.models = models
        self.downloads = downloads
        self.generations = generations
        self.key_required = key_required
        self.interval = interval
        self.started = time.monotonic()
        self.series: deque[Point] = deque(maxlen=SERIES_SECONDS)
        self._counted: dict[str, int] = {}  # engine "tokens" counters at the last tick
        self._last_tick = time.monotonic()
        self._ttfts: list[float] = []
        self._recent: deque[GenerationRecord] = deque(maxlen=RECENT_REQUESTS)
        generations.listeners.append(self._finished)
        self._snapshot: dict[str, Any] | None = None
        self._snapshot_at = 0.0
        self.max_feeds = MAX_FEEDS
        self._feeds: set[object] = set()

    # -- live feeds ---------------------------------------------------------------------

    def open_feed(self) -> object:
        """A place for one more live feed; 429 when MAX_FEEDS are open."""
        if len(self._feeds) >= self.max_feeds:
            raise QueueFullError(
                f"{self.max_feeds} status pages are open already; close one and try again",
                headers={"Retry-After": "5"},
            )
        token = object()
        self._feeds.add(token)
        return token

    def close_feed(self, token: object) -> None:
        self._feeds.discard(token)

    # -- fed as things happen ---------------------------------------------------------

    def _finished(self, record: GenerationRecord) -> None:
        self._recent.append(record)
        if record.latency is not None:
            self._ttfts.append(record.latency)

    def tick(self) -> None:
        """One point of the plot (called once a second): tokens the chat engines
        generated since the last tick."""
        now = time.monotonic()
        generated = 0
        counters: dict[str, int] = {}
        for model_id, engine in self.models.pool.loaded.items():
            tokens = engine.health().get("tokens")
            if not isinstance(tokens, int):
                continue  # an embedding model, or a dead engine
            before = self._counted.get(model_id)
            if before is not None:  # a model seen for the first time sets its baseline
                generated += tokens - before if tokens >= before else tokens  # reloaded
            counters[model_id] = tokens
        self._counted = counters
        elapsed = max(now - self._last_tick, 1e-3)
        self._last_tick = now
        ttft = sum(self._ttfts) / len(self._ttfts) * 1000 if self._ttfts else None
        self._ttfts.clear()
        self.series.append(Point(time.time(), generated / elapsed, ttft))

    # -- read by the page ---------------------------------------------------------------

    def latest(self) -> dict[str, Any]:
        """The snapshot, rebuilt when older than `interval` (one build per interval,
        shared by every page that watches)."""
        now = time.monotonic()
        if self._snapshot is None or now - self._snapshot_at >= self.interval:
            self._snapshot, self._snapshot_at = self.snapshot(), now
        return self._snapshot

    def snapshot(self) -> dict[str, Any]:
        loaded = {str(e["model"]): e for e in self.models.status()}
        models = [self._model(spec_id, loaded.get(spec_id)) for spec_id in self._ids()]
        busy = sum(m.get("slots_busy") or 0 for m in models)
        slots = sum(m.get("slots") or 0 for m in models if m["state"] == "loaded")
        return {
            "server": {
                "version": __version__,
                "uptime_seconds": round(time.monotonic() - self.started),
                "rss_bytes": resident_bytes() or None,
                "key_required": self.key_required(),
                "default_model": self.models.default_model,
                "status_pages": len(self._feeds),
            },
            "totals": {
                "slots": slots,
                "slots_busy": busy,
                "queued": sum(m.get("queued") or 0 for m in models),
                "tok_s": round(self.series[-1].tok_s, 1) if self.series else 0.0,
            },
            "models": models,
            "series": [
                {
                    "t": round(p.t, 1),
                    "tok_s": round(p.tok_s, 1),
                    "ttft_ms": None if p.ttft_ms is None else round(p.ttft_ms),
                }
                for p in self.series
            ],
            "requests": [_request(r) for r in reversed(self._recent)],
        }

    def _ids(self) -> list[str]:
        """Chat models first, as /v1/models lists them."""
        return [s.id for s in sorted(self.models.registry, key=lambda s: s.embedding)]

    def _model(self, model_id: str, entry: dict[str, Any] | None) -> dict[str, Any]:
        spec = self.models.registry.get(model_id)
        pull = self.downloads.get(model_id)
        out: dict[str, Any] = {
            "id": spec.id,
            "name": spec.name or spec.id,
            "kind": spec.kind,
            "pinned": spec.pinned,
            "download": None if pull is None else pull.to_json(),
        }
        if entry is not None:
            out.update(entry)
            out.pop("model", None)
        elif self.downloads.running(model_id):
            out["state"] = "downloading"
        elif local_file(spec) is not None:
            out["state"] = "downloaded"
        else:
            out["state"] = "not downloaded"
        if model_id == self.models.starting:
            out["state"] = self.models.starting_phase  # downloading, then loading
        engine = self.models.pool.loaded.get(model_id)
        if engine is not None:
            health = engine.health()
            out["queued"] = health.get("queued", 0)
            out["slot_list"] = health.get("slot_list", [])
            out["cache"] = _cache(health)
            out["requests_served"] = health.get("requests")
        else:
            out.setdefault("context", spec.context)
        return out


def _cache(health: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The prompt cache per tier (the slots themselves first: the prefix they keep)."""
    requests = health.get("requests") or 0
    tiers: list[dict[str, Any]] = [
        {
            "tier": "slots",
            "cached_tokens": health.get("cached_tokens", 0),
            "restored_tokens": health.get("restored_tokens", 0),
            "reused_chunk_tokens": health.get("reused_chunk_tokens", 0),
        }
    ]
    for name, stats in (health.get("cache") or {}).items():
        hits = int(stats.get("hits", 0))
        tiers.append(
            {
                "tier": name,
                "entries": stats.get("entries", 0),
                "bytes": stats.get("bytes", 0),
                "limit_bytes": stats.get("limit_bytes", 0),
                "hits": hits,
                "hit_rate": round(hits / requests, 3) if requests else None,
            }
        )
    return tiers if "requests" in health else None


def _request(r: GenerationRecord) -> dict[str, Any]:
    decode = r.generation_time - (r.latency or 0.0)
    rate = (r.tokens_completion - 1) / decode if r.tokens_completion > 1 and decode > 0 else None
    return {
        "id": r.id,
        "created_at": r.created_at,
        "route": r.route,
        "model": r.model,
        "prompt_tokens": r.tokens_prompt,
        "cached_tokens": r.cached_tokens,
        "completion_tokens": r.tokens_completion,
        "ttft_ms": None if r.latency is None else round(r.latency * 1000),
        "tok_s": None if rate is None else round(rate, 1),
        "seconds": round(r.generation_time, 2),
        "status": r.finish_reason,
    }
