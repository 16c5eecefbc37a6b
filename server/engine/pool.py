"""Loaded engines by model id: load on first use, keep up to `max_models`, unload idle ones.

A model that cannot load never costs the ones that can: the cheap checks (is the file
there, does it verify) run before anything is evicted, and if loading itself fails
after an eviction, the evicted models are loaded again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from server.engine.types import Engine
from server.errors import ServiceUnavailableError

log = logging.getLogger("hostler.pool")


class ModelPool:
    def __init__(
        self,
        loader: Callable[[str], Engine],
        max_models: int = 1,
        check: Callable[[str], None] | None = None,
    ) -> None:
        self._loader = loader
        self._check = check
        self._max = max_models
        self._engines: dict[str, Engine] = {}
        self._used: dict[str, float] = {}
        self._lock = asyncio.Lock()
        self.loads = 0
        # Model id -> when it may be unloaded once idle (Ollama's keep_alive); absent: kept.
        self._deadline: dict[str, float] = {}

    @property
    def loaded(self) -> dict[str, Engine]:
        return dict(self._engines)

    async def get(self, model_id: str) -> Engine:
        engine = self._engines.get(model_id)
        if engine is None:
            async with self._lock:
                engine = self._engines.get(model_id)
                if engine is None:
                    engine = await self._load(model_id)
        self._used[model_id] = time.monotonic()
        return engine

    async def _load(self, model_id: str) -> Engine:
        if self._check is not None:
            await asyncio.to_thread(self._check, model_id)  # raises before any eviction
        evicted = await self._make_room()
        try:
            engine = await asyncio.to_thread(self._loader, model_id)
        except BaseException:
            for victim in evicted:  # leave the pool as it was
                try:
                    self._engines[victim] = await asyncio.to_thread(self._loader, victim)
                    self.loads += 1
                except Exception:
                    log.exception("could not reload model %s", victim)
            raise
        self._engines[model_id] = engine
        self.loads += 1
        return engine

    async def _make_room(self) -> list[str]:
        evicted: list[str] = []
        while len(self._engines) >= self._max:
            idle = [k for k, e in self._engines.items() if not e.busy]
            if not idle:
                raise ServiceUnavailableError(
                    "all loaded models are busy; cannot load another one now",
                    headers={"Retry-After": "5"},
                )
            victim = min(idle, key=lambda k: self._used.get(k, 0.0))
            engine = self._engines.pop(victim)
            await asyncio.to_thread(engine.close)
            evicted.append(victim)
        return evicted

    def keep_alive(self, model_id: str, seconds: float) -> None:
        """Unload `model_id` once idle and `seconds` from now have passed (Ollama's
        keep_alive: 0 unloads after the reply); a negative value keeps it loaded."""
        if seconds < 0:
            self._deadline.pop(model_id, None)
        else:
            self._deadline[model_id] = time.monotonic() + seconds

    async def reap(self) -> list[str]:
        """Unload the idle models whose keep_alive has run out; their ids."""
        gone: list[str] = []
        async with self._lock:
            now = time.monotonic()
            for model_id, deadline in list(self._deadline.items()):
                engine = self._engines.get(model_id)
                if engine is None:
                    del self._deadline[model_id]
                elif now >= deadline and not engine.busy:
                    del self._deadline[model_id]
                    del self._engines[model_id]
                    await asyncio.to_thread(engine.close)
                    log.info("model %s unloaded (keep_alive ran out)", model_id)
                    gone.append(model_id)
        return gone

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()
