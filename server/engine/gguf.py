"""A GGUF file's metadata, read in Python: the model's shape without loading it.

llama.cpp offers no safe way to read hyperparameters without loading the weights (a
vocab-only model aborts on `llama_model_n_head`), so the few keys the memory estimate
needs are read from the file's header here: architecture, layers, width, heads, context.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from server.errors import ModelLoadError

# Bytes per KV cache element, by cache type.
KV_BYTES: dict[str, float] = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}

# GGUF value types: id -> struct format (8 string, 9 array).
_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
    10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_MAX_KEYS = 1 << 16


@dataclass(frozen=True)
class Shape:
    """The size facts of a model that its memory use follows from."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ctx_train: int
    file_bytes: int
    head_dim_k: int = 0
    head_dim_v: int = 0

    def kv_bytes(self, n_ctx: int, kv_type: str = "f16", layers: int | None = None) -> int:
        """K and V for `n_ctx` cells over `layers` layers (all by default)."""
        default = self.n_embd // max(self.n_head, 1)
        dims = (self.head_dim_k or default) + (self.head_dim_v or default)
        per_cell = self.n_head_kv * dims * KV_BYTES[kv_type]
        return int(per_cell * n_ctx * (self.n_layer if layers is None else layers))


def _read(f: IO[bytes], fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("the file ends inside its header")
    return struct.unpack(fmt, data)[0]


def _string(f: IO[bytes]) -> str:
    n = _read(f, "<Q")
    if n > 1 << 24:
        raise ValueError("a header string is implausibly long")
    return f.read(n).decode("utf-8", errors="replace")


def _value(f: IO[bytes], kind: int, keep: bool) -> Any:
    if kind in _SCALARS:
        return _read(f, _SCALARS[kind])
    if kind == 8:
        return _string(f)
    if kind == 9:
        item, n = _read(f, "<I"), _read(f, "<Q")
        if item in _SCALARS and not keep:
            f.seek(n * struct.calcsize(_SCALARS[item]), 1)  # e.g. token scores: skip
            return None
        values = [_value(f, item, keep) for _ in range(n)]
        return values if keep else None
    raise ValueError(f"unknown GGUF value type {kind}")


def read_metadata(path: Path, wanted: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """The header's key/value pairs (only those `wanted` says to keep, when given); the
    others (the vocabulary: 100k+ strings) are skipped."""
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        version = _read(f, "<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        _read(f, "<Q")  # tensor count
        n_kv = _read(f, "<Q")
        if n_kv > _MAX_KEYS:
            raise ValueError("implausibly many header keys")
        out: dict[str, Any] = {}
        for _ in range(n_kv):
            key = _string(f)
            keep = wanted is None or key == "general.architecture" or wanted(key)
            value = _value(f, _read(f, "<I"), keep)
            if keep:
                out[key] = value
        return out


def read_shape(path: Path) -> Shape:
    """The model's shape from its GGUF header; ModelLoadError if it cannot be read."""
    keys = ("block_count", "embedding_length", "attention.head_count", "attention.head_count_kv",
            "context_length", "attention.key_length", "attention.value_length")  # fmt: skip
    suffixes = tuple("." + k for k in keys)
    try:
        meta = read_metadata(path, lambda key: key.endswith(suffixes))
    except (OSError, ValueError, struct.error) as exc:
        raise ModelLoadError(f"cannot read the header of {path.name}: {exc}") from exc
    arch = str(meta.get("general.architecture", ""))

    def num(key: str, default: int = 0) -> int:
        value = meta.get(f"{arch}.{key}", default)
        if isinstance(value, list):  # per-layer values: the largest bounds the memory
            value = max(value) if value else default
        return int(value)

    n_head = num("attention.head_count", 1)
    return Shape(
        n_layer=num("block_count"),
        n_embd=num("embedding_length"),
        n_head=n_head,
        n_head_kv=num("attention.head_count_kv", n_head),
        n_ctx_train=num("context_length"),
        file_bytes=path.stat().st_size,
        head_dim_k=num("attention.key_length"),
        head_dim_v=num("attention.value_length"),
    )
