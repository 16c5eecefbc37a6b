"""Memory estimates: the GGUF header reader, KV cache sizes, and `gpu_layers: auto`."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from server.engine.gguf import Shape, read_shape
from server.engine.gpu import RESERVE_BYTES, fit_layers
from server.errors import ModelLoadError

GIB = 2**30
# Rocinante 12B (Mistral-Nemo): 40 layers, hidden 5120, 32 heads / 8 KV heads of 128.
NEMO = Shape(
    n_layer=40, n_embd=5120, n_head=32, n_head_kv=8, n_ctx_train=1024000,
    file_bytes=int(7.48 * GIB), head_dim_k=128, head_dim_v=128,
)  # fmt: skip


def _gguf(path: Path, kv: list[tuple[str, int, bytes]]) -> Path:
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv))
    for key, kind, value in kv:
        out += struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", kind) + value
    path.write_bytes(out)
    return path


def _str(s: str) -> bytes:
    return struct.pack("<Q", len(s)) + s.encode()


def test_reads_the_shape_and_skips_the_vocabulary(tmp_path: Path) -> None:
    tokens = struct.pack("<IQ", 8, 3) + b"".join(_str(t) for t in ("a", "b", "c"))
    f = _gguf(
        tmp_path / "m.gguf",
        [
            ("general.architecture", 8, _str("llama")),
            ("tokenizer.ggml.tokens", 9, tokens),
            ("llama.block_count", 4, struct.pack("<I", 40)),
            ("llama.embedding_length", 4, struct.pack("<I", 5120)),
            ("llama.attention.head_count", 4, struct.pack("<I", 32)),
            (
                "llama.attention.head_count_kv",
                9,
                struct.pack("<IQ", 4, 2) + struct.pack("<II", 8, 4),
            ),
            ("llama.context_length", 4, struct.pack("<I", 131072)),
            ("llama.attention.key_length", 4, struct.pack("<I", 128)),
        ],
    )
    shape = read_shape(f)
    assert (shape.n_layer, shape.n_embd, shape.n_head) == (40, 5120, 32)
    assert shape.n_head_kv == 8  # per-layer values: the largest
    assert shape.n_ctx_train == 131072 and shape.head_dim_k == 128


def test_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"nope")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        read_shape(tmp_path / "x.gguf")


def test_kv_cache_sizes_for_rocinante() -> None:
    # 2 (K, V) x 8 heads x 128 x 2 bytes x 40 layers = 160 KiB per token at f16.
    assert NEMO.kv_bytes(16384) == 16384 * 160 * 1024
    assert NEMO.kv_bytes(16384, "q8_0") == pytest.approx(NEMO.kv_bytes(16384) * 17 / 32, rel=1e-6)


@pytest.mark.parametrize(
    ("vram_gib", "ctx", "kv", "expected"),
    [
        (24, 16384, "f16", -1),  # all 41 fit
        (12, 16384, "f16", -1),  # 7.5 GiB of weights + 2.5 GiB of KV + 1 GiB reserve
        (12, 32768, "f16", 35),  # 5 GiB of KV: 35 of 40 layers
        (8, 16384, "f16", 28),
        (8, 16384, "q8_0", 32),  # a q8_0 cache leaves room for 4 more layers
        (2, 16384, "f16", 4),
        (1, 4096, "f16", 0),
    ],
)
def test_gpu_layers_auto(vram_gib: int, ctx: int, kv: str, expected: int) -> None:
    assert fit_layers(NEMO, ctx, kv, vram_gib * GIB) == expected
    if expected > 0:
        per = NEMO.file_bytes / 41 + NEMO.kv_bytes(ctx, kv, layers=1)
        assert expected * per <= vram_gib * GIB - RESERVE_BYTES
