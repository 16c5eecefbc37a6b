"""API keys: which key a request carries, and what it may still use.

Keys come from the `api_key` setting (one, unnamed, no quota) and the `keys` setting
(named, each with an optional requests-per-minute rate and tokens-per-day quota). With
neither set, the API is open. Tokens are counted when a generation ends, however it
ends; a request is refused (429, `Retry-After`) once the key's quota is used up. The
`metrics_key` setting reads /metrics and /v1/loads only: what a router or scraper holds
(`metrics_open` opens them to anyone).
"""

from __future__ import annotations

import hmac
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from server.config import ApiKey, Settings
from server.errors import AuthenticationError, RateLimitError

MINUTE = 60.0
DAY = 86_400.0


@dataclass(eq=False)
class KeyState:
    """One key's identity and its usage in the current windows."""

    spec: ApiKey | None  # None: the API is open, or the plain `api_key`
    label: str
    _requests: deque[float] = field(default_factory=deque)
    _day_start: float = field(default_factory=time.monotonic)
    tokens_today: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def admit(self) -> None:
        """Count one request; raise RateLimitError when a limit is reached."""
        if self.spec is None:
            return
        now = time.monotonic()
        with self._lock:
            self._roll_day(now)
            quota = self.spec.tokens_per_day
            if quota is not None and self.tokens_today >= quota:
                wait = self._day_start + DAY - now
                raise RateLimitError(
                    f"key '{self.spec.name}' used its {quota} tokens for today",
                    headers={"Retry-After": str(math.ceil(wait))},
                )
            rpm = self.spec.requests_per_minute
            if rpm is not None:
                while self._requests and self._requests[0] <= now - MINUTE:
                    self._requests.popleft()
                if len(self._requests) >= rpm:
                    wait = self._requests[0] + MINUTE - now
                    raise RateLimitError(
                        f"key '{self.spec.name}' is limited to {rpm} requests a minute",
                        headers={"Retry-After": str(max(1, math.ceil(wait)))},
                    )
                self._requests.append(now)

    def add_tokens(self, n: int) -> None:
        with self._lock:
            self._roll_day(time.monotonic())
            self.tokens_today += n

    def _roll_day(self, now: float) -> None:
        if now - self._day_start >= DAY:
            self._day_start = now
            self.tokens_today = 0

    def describe(self) -> dict[str, Any]:
        """OpenRouter's `GET /api/v1/auth/key` data: usage in tokens, limits per key."""
        spec = self.spec
        limit = spec.tokens_per_day if spec else None
        with self._lock:
            self._roll_day(time.monotonic())
            used = self.tokens_today
        return {
            "label": self.label,
            "usage": used,
            "limit": limit,
            "limit_remaining": None if limit is None else max(limit - used, 0),
            "is_free_tier": False,
            "rate_limit": {
                "requests": spec.requests_per_minute if spec else None,
                "interval": "1m",
            },
        }


class KeyRing:
    """All configured keys; `authenticate` finds the caller's in constant time."""

    def __init__(self, settings: Settings) -> None:
        self._keys: list[tuple[bytes, KeyState]] = []
        if settings.api_key:
            self._keys.append((settings.api_key.encode(), KeyState(None, "hostler")))
        for spec in settings.keys:
            self._keys.append((spec.key.encode(), KeyState(spec, spec.name)))
        self.open = not self._keys
        self._anonymous = KeyState(None, "hostler (no key required)")
        self._metrics = settings.metrics_key.encode() if settings.metrics_key else None
        self._metrics_open = settings.metrics_open

    def authenticate_metrics(self, token: str | None) -> None:
        """/metrics and /v1/loads: the metrics key or any API key; open with neither, or
        with `metrics_open`."""
        if self._metrics_open:
            return
        if self._metrics is None:
            self.authenticate(token)
            return
        if token is not None and hmac.compare_digest(token.encode(), self._metrics):
            return
        if self.open:
            raise AuthenticationError(
                "missing or invalid metrics key: send 'Authorization: Bearer <metrics key>'"
            )
        self.authenticate(token)

    def authenticate(self, token: str | None) -> KeyState:
        if self.open:
            return self._anonymous
        if token is None:
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
        given = token.encode()
        found: KeyState | None = None
        for secret, state in self._keys:  # compare with every key: no early exit
            if hmac.compare_digest(given, secret) and found is None:
                found = state
        if found is None:
            raise AuthenticationError("invalid API key")
        return found
