"""Loaded engines by model id: load on first use, evict by count and memory, unload idle ones.

A model that cannot load never costs the ones that can: the cheap checks (is the file
there, does it verify, does it fit the memory budget at all) run before anything is
evicted, and if loading itself fails after an eviction, the evicted models are loaded
again. Pinned models are never evicted or unloaded for being idle.

keep_alive follows Ollama: a duration after the model was last busy, 0 unloads it once
its replies are done, a negative value (or none) keeps it loaded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.engine.types import Engine, ModelInfo
from server.errors import ModelLoadError, ServiceUnavailableError

log = logging.getLogger("hostler.pool")

GIB = 2**30

CRASH_WINDOW = 120.0
"""A model whose engine dies twice within this many seconds is marked failed."""


@dataclass
class Loaded:
    """One loaded model and what the pool knows of it."""

    engine: Engine
    loaded_at: float
    load_seconds: float
    bytes: int
    """Estimated memory it holds (weights + KV cache)."""
    idle_since: float = field(default_factory=time.monotonic)
    keep_alive: float | None = None
    """Seconds it stays loaded once idle; None: until evicted."""
    unload_requested: bool = False


class ModelPool:
    def __init__(
        self,
        loader: Callable[[str], Engine],
        max_models: int = 1,
        check: Callable[[str], None] | None = None,
        *,
        estimate: Callable[[str], int] | None = None,
        budget_bytes: int | None = None,
        pinned: Callable[[str], bool] | None = None,
        keep_alive: Callable[[str], float | None] | None = None,
        counted: Callable[[str], bool] | None = None,
    ) -> None:
        self._loader = loader
        self._check = check
        self._estimate = estimate or (lambda _m: 0)
        self._budget = budget_bytes
        self._pinned = pinned or (lambda _m: False)
        self._default_keep = keep_alive or (lambda _m: None)
        self._max = max_models
        self._counted = counted or (lambda _m: True)
        """Which models `max_models` counts (embedding models do not: they are small)."""
        self._models: dict[str, Loaded] = {}
        self._lock = asyncio.Lock()
        self._tasks: dict[str, asyncio.Future[Loaded]] = {}
        self.loading: dict[str, float] = {}
        """Model id -> when its load began, while it loads."""
        self.loads = 0
        self.deaths: dict[str, tuple[float, str]] = {}
        """Model id -> when its engine process last died, and why."""
        self.failed: dict[str, str] = {}
        """Models refused until loaded again explicitly: died twice within CRASH_WINDOW."""

    @property
    def loaded(self) -> dict[str, Engine]:
        return {k: m.engine for k, m in self._models.items()}

    def is_loaded(self, model_id: str) -> bool:
        return model_id in self._models

    async def get(self, model_id: str) -> Engine:
        """The model's engine, loading it first if need be.

        A load runs as a task of its own that every waiting request shares: a request
        cancelled while it waits (a client that left) never abandons a half-loaded model.
        """
        entry = self._models.get(model_id)
        if entry is not None and _dead(entry.engine):
            self._bury(model_id, entry)
            entry = None
        if entry is None and model_id in self.failed:
            raise ServiceUnavailableError(
                f"model '{model_id}' failed and is not reloaded (its engine died twice within"
                f" {CRASH_WINDOW:.0f} s): {self.failed[model_id]}; load it again with POST"
                f" /v1/models/{model_id}/load",
                headers={"Retry-After": "30"},
            )
        if entry is None:
            task = self._tasks.get(model_id)
            if task is None:
                task = asyncio.ensure_future(self._load_locked(model_id))
                self._tasks[model_id] = task
                task.add_done_callback(lambda t: self._load_done(model_id, t))
            entry = await asyncio.shield(task)
        entry.idle_since = time.monotonic()
        return entry.engine

    async def _load_locked(self, model_id: str) -> Loaded:
        async with self._lock:
            entry = self._models.get(model_id)
            return entry if entry is not None else await self._load(model_id)

    def _load_done(self, model_id: str, task: asyncio.Future[Loaded]) -> None:
        self._tasks.pop(model_id, None)
        if not task.cancelled():
            task.exception()  # retrieved: the waiters got it; no "never retrieved" warning

    async def _load(self, model_id: str) -> Loaded:
        if self._check is not None:
            await asyncio.to_thread(self._check, model_id)  # raises before any eviction
        need = await asyncio.to_thread(self._estimate, model_id)
        if self._budget is not None and need > self._budget:
            raise ModelLoadError(
                f"model '{model_id}' needs about {need / GIB:.1f} GiB (weights + KV cache);"
                f" the memory budget is {self._budget / GIB:.1f} GiB"
            )
        evicted = await self._make_room(need, self._counted(model_id))
        self.loading[model_id] = time.monotonic()
        started = time.monotonic()
        try:
            engine = await asyncio.to_thread(self._loader, model_id)
        except BaseException:
            log.warning("model %s failed to load", model_id)
            for victim, entry in evicted:  # leave the pool as it was
                try:
                    entry.engine = await asyncio.to_thread(self._loader, victim)
                    self._models[victim] = entry
                    self.loads += 1
                except Exception:
                    log.exception("could not reload model %s", victim)
            raise
        finally:
            self.loading.pop(model_id, None)
        seconds = time.monotonic() - started
        entry = Loaded(
            engine,
            loaded_at=time.time(),
            load_seconds=seconds,
            bytes=need,
            keep_alive=self._default_keep(model_id),
        )
        self._models[model_id] = entry
        self.loads += 1
        log.info("model %s loaded in %.1f s: %s", model_id, seconds, describe(engine, need))
        return entry

    def _bury(self, model_id: str, entry: Loaded) -> None:
        """Forget a model whose engine process died; a second death within
        CRASH_WINDOW marks it failed (no crash loop)."""
        if self._models.get(model_id) is entry:
            del self._models[model_id]
        engine: Any = entry.engine
        reason = str(engine.dead)
        died_at = float(getattr(engine, "died_at", None) or time.monotonic())
        last = self.deaths.get(model_id)
        if last is not None and died_at - last[0] < CRASH_WINDOW:
            self.failed[model_id] = reason
            log.error("model %s is marked failed: its engine died twice in a row", model_id)
        self.deaths[model_id] = (died_at, reason)
        try:
            engine.close()  # reaps the dead process
        except Exception:
            log.exception("closing the dead engine of %s failed", model_id)

    def bury_dead(self) -> list[str]:
        """Forget every model whose engine process died (called by the reaper)."""
        dead = [(k, m) for k, m in self._models.items() if _dead(m.engine)]
        for model_id, entry in dead:
            self._bury(model_id, entry)
        return [k for k, _ in dead]

    def clear_failure(self, model_id: str) -> None:
        """An explicit load: a failed model may be tried again."""
        self.failed.pop(model_id, None)
        self.deaths.pop(model_id, None)

    def _used_bytes(self) -> int:
        return sum(m.bytes for m in self._models.values())

    async def _make_room(self, need: int, counted: bool) -> list[tuple[str, Loaded]]:
        evicted: list[tuple[str, Loaded]] = []

        def over_budget() -> bool:
            return self._budget is not None and self._used_bytes() + need > self._budget

        def over_count() -> bool:
            return counted and sum(1 for k in self._models if self._counted(k)) >= self._max

        while self._models and (over_budget() or over_count()):
            # Too many models: another counted one goes; too little memory: any idle one.
            anyone = over_budget()
            idle = [
                k
                for k, m in self._models.items()
                if not m.engine.busy and not self._pinned(k) and (anyone or self._counted(k))
            ]
            if not idle:
                raise ServiceUnavailableError(
                    "the loaded models are busy or pinned; cannot load another one now",
                    headers={"Retry-After": "5"},
                )
            victim = min(idle, key=lambda k: self._models[k].idle_since)
            entry = self._models.pop(victim)
            await asyncio.to_thread(entry.engine.close)
            log.info("model %s unloaded to make room (%s)", victim, _gib(entry.bytes))
            evicted.append((victim, entry))
        return evicted

    def keep_alive(self, model_id: str, seconds: float | None) -> None:
        """A request's keep_alive for `model_id` (loaded): None or negative keeps it."""
        entry = self._models.get(model_id)
        if entry is not None:
            entry.keep_alive = None if seconds is None or seconds < 0 else seconds
            entry.idle_since = time.monotonic()

    async def unload(self, model_id: str) -> bool:
        """Unload now if idle; if busy, once its replies are done. False: not loaded."""
        entry = self._models.get(model_id)
        if entry is None:
            return False
        entry.unload_requested = True
        await self.reap()
        return True

    async def reap(self) -> list[str]:
        """Unload the idle models whose keep_alive has run out; their ids."""
        gone: list[str] = []
        async with self._lock:
            self.bury_dead()
            now = time.monotonic()
            for model_id, entry in list(self._models.items()):
                if entry.engine.busy:
                    entry.idle_since = now
                    continue
                if not entry.unload_requested and (
                    self._pinned(model_id) or entry.keep_alive is None
                ):
                    continue
                if entry.unload_requested or now - entry.idle_since >= (entry.keep_alive or 0):
                    del self._models[model_id]
                    await asyncio.to_thread(entry.engine.close)
                    log.info("model %s unloaded (idle %.0f s)", model_id, now - entry.idle_since)
                    gone.append(model_id)
        return gone

    def status(self) -> list[dict[str, Any]]:
        """What is loaded: for `hostler ps` and GET /v1/models/status."""
        now = time.monotonic()
        out: list[dict[str, Any]] = []
        for model_id, m in self._models.items():
            health = m.engine.health()
            busy = bool(m.engine.busy)
            until = None
            if m.keep_alive is not None and not self._pinned(model_id):
                until = max(0.0, m.keep_alive - (now - m.idle_since))
            out.append(
                {
                    "model": model_id,
                    "state": "dead" if _dead(m.engine) else "loaded",
                    "pid": health.get("pid"),
                    "rss_bytes": health.get("rss_bytes"),
                    "error": health.get("error"),
                    "memory_bytes": m.bytes,
                    "loaded_at": int(m.loaded_at),
                    "load_seconds": round(m.load_seconds, 2),
                    "idle_seconds": 0.0 if busy else round(now - m.idle_since, 1),
                    "slots": health.get("slots"),
                    "slots_busy": health.get("slots_busy"),
                    **_facts(m.engine.info),
                    "pinned": self._pinned(model_id),
                    "unloads_in_seconds": None if until is None else round(until, 1),
                }
            )
        for model_id, since in self.loading.items():
            out.append(
                {"model": model_id, "state": "loading", "loading_seconds": round(now - since, 1)}
            )
        for model_id, reason in self.failed.items():
            if model_id not in self._models:
                out.append({"model": model_id, "state": "failed", "error": reason})
        return out

    def close(self) -> None:
        for entry in self._models.values():
            entry.engine.close()
        self._models.clear()


def _dead(engine: Engine) -> bool:
    """An engine whose process died (a ProcessEngine's `dead` says why)."""
    return bool(getattr(engine, "dead", None))


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def describe(engine: Engine, estimate: int) -> str:
    """One line about a loaded engine: context, slots, GPU layers, KV cache, memory."""
    info = engine.info
    parts = [f"context {info.n_ctx}", f"{info.slots} slots"]
    if info.n_layer:
        where = "devices" if info.rpc_devices else "GPU"
        parts.append(f"{info.gpu_layers}/{info.n_layer} layers on {where}")
    if info.rpc_devices:
        parts.append("RPC workers " + ", ".join(info.rpc_devices))
    if len(info.devices) > 1 or info.rpc_devices:
        parts.append("devices: " + "; ".join(d.describe() for d in info.devices))
    if info.kv_bytes:
        parts.append(f"KV cache {_gib(info.kv_bytes)} ({info.kv_type})")
    parts.append(f"weights {_gib(info.size_bytes)}")
    health = engine.health()
    if health.get("pid"):
        parts.append(f"engine pid {health['pid']}, RSS {_gib(int(health.get('rss_bytes') or 0))}")
    rss = resident_bytes()
    if rss:
        parts.append(f"API process RSS {_gib(rss)}")
    if estimate:
        parts.append(f"estimate {_gib(estimate)}")
    return ", ".join(parts)


def resident_bytes() -> int:
    """This process's resident memory (0 where /proc is not available)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def _facts(info: ModelInfo) -> dict[str, Any]:
    """How a loaded model is laid out: context, KV type, layers on the GPU and the
    estimated VRAM they take (their share of the file plus of the KV cache)."""
    layers = info.n_layer + 1  # llama.cpp counts the output layer as one more
    on_gpu = min(info.gpu_layers, layers)
    share = on_gpu / layers
    return {
        "context": info.n_ctx,
        "kv_type": info.kv_type,
        "gpu_layers": on_gpu,
        "layers": layers,
        "vram_bytes": int((info.size_bytes + info.kv_bytes) * share),
        "rpc_devices": list(info.rpc_devices),
        "devices": [
            {
                "device": d.device,
                "worker": d.worker,
                "layers": d.layers,
                "bytes": d.bytes,
                "output": d.output,
            }
            for d in info.devices
        ],
    }
