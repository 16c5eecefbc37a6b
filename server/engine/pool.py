"""Loaded engines by model id: load on first use, keep up to `max_models`, unload idle ones."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from server.engine.types import Engine
from server.errors import ServiceUnavailableError


class ModelPool:
    def __init__(self, loader: Callable[[str], Engine], max_models: int = 1) -> None:
        self._loader = loader
        self._max = max_models
        self._engines: dict[str, Engine] = {}
        self._used: dict[str, float] = {}
        self._lock = asyncio.Lock()

    @property
    def loaded(self) -> dict[str, Engine]:
        return dict(self._engines)

    async def get(self, model_id: str) -> Engine:
        engine = self._engines.get(model_id)
        if engine is None:
            async with self._lock:
                engine = self._engines.get(model_id)
                if engine is None:
                    await self._make_room()
                    engine = await asyncio.to_thread(self._loader, model_id)
                    self._engines[model_id] = engine
        self._used[model_id] = time.monotonic()
        return engine

    async def _make_room(self) -> None:
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

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()
