"""Ollama's durations (`keep_alive`): seconds as a number, or Go's "5m", "1h30m", "-1"."""

from __future__ import annotations

import contextlib
import math
import re

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")


def keep_alive(value: str | float | None) -> float | None:
    """A keep_alive as the pool takes it: seconds, or None for "keep it loaded"."""
    if value is None:
        return None
    s = seconds(value)
    return None if s < 0 else s


def checked(value: str | float | None) -> str | float | None:
    """`value` itself, once it is known to be a duration (a pydantic validator)."""
    if value is not None:
        seconds(value)
    return value


def seconds(value: str | int | float) -> float:
    """The duration in seconds (negative: forever); ValueError if it is not one."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a finite duration")
        return float(value)
    text = value.strip()
    if len(text) > 64:
        raise ValueError("a duration is at most 64 characters")
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    number = math.nan
    with contextlib.suppress(ValueError):
        number = float(body)
    if math.isfinite(number):
        return sign * number
    parts = _PART.findall(body)
    if not parts or "".join(n + u for n, u in parts) != body:
        raise ValueError(f'{value!r} is not a duration (e.g. 300, "5m", "1h", -1)')
    return sign * sum(float(n) * _UNITS[u] for n, u in parts)
