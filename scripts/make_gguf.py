#!/usr/bin/env python3
"""Write a GGUF with random Q4_K weights in a given shape, for speed tests without a download.

The default shape is Rocinante 12B's (Mistral-Nemo: 40 layers, hidden 5120, FFN 14336,
32 heads / 8 KV heads of 128, vocabulary 131072), about 7 GB like its Q4_K_M file:

    scripts/make_gguf.py ~/.cache/hostler/nemo-random-q4k.gguf
    scripts/make_gguf.py /tmp/tiny.gguf --layers 2 --hidden 256 --ffn 512 --heads 4 \\
        --kv-heads 2 --head-dim 64 --vocab 1024

Llama architecture, a SentencePiece vocabulary of byte tokens plus filler words, norms of
ones, every matrix Q4_K with random quants and scales chosen so weights average zero.
The text it writes is noise; its speed is the real model's.
"""

from __future__ import annotations

import argparse
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

ALIGN = 32
Q4_K, F32 = 12, 0  # ggml types
Q4_K_BLOCK, Q4_K_BYTES = 256, 144  # weights per block, bytes per block


def _s(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _kv(key: str, kind: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", kind) + payload


def _u32(key: str, v: int) -> bytes:
    return _kv(key, 4, struct.pack("<I", v))


def _f32(key: str, v: float) -> bytes:
    return _kv(key, 6, struct.pack("<f", v))


def _str(key: str, v: str) -> bytes:
    return _kv(key, 8, _s(v))


def _array(key: str, item: int, values: list[bytes]) -> bytes:
    return _kv(key, 9, struct.pack("<IQ", item, len(values)) + b"".join(values))


def _vocab(n: int) -> list[bytes]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581w{i}" for i in range(n - len(tokens))]
    return [
        _array("tokenizer.ggml.tokens", 8, [_s(t) for t in tokens]),
        _array("tokenizer.ggml.scores", 6, [struct.pack("<f", -float(i)) for i in range(n)]),
        _array(
            "tokenizer.ggml.token_type",
            5,
            [struct.pack("<i", 3 if i < 3 else 6 if i < 259 else 1) for i in range(n)],
        ),
    ]


def _q4k_rows(rng: np.random.Generator, cols: int, rows: int) -> bytes:
    """Random Q4_K data for a rows x cols matrix (cols a multiple of 256)."""
    blocks = rows * cols // Q4_K_BLOCK
    data = rng.integers(0, 256, size=(blocks, Q4_K_BYTES), dtype=np.uint8)
    # d and dmin (f16) so that d*scale*q - dmin*min averages zero: weights within ~0.2.
    data[:, 0:2] = np.frombuffer(np.float16(2e-4).tobytes(), dtype=np.uint8)
    data[:, 2:4] = np.frombuffer(np.float16(1.5e-3).tobytes(), dtype=np.uint8)
    return data.tobytes()


def write(path: Path, a: argparse.Namespace) -> None:
    hd, q, kv = a.head_dim, a.heads * a.head_dim, a.kv_heads * a.head_dim
    mats: list[tuple[str, int, int]] = [("token_embd.weight", a.hidden, a.vocab)]
    norms: list[tuple[str, int]] = [("output_norm.weight", a.hidden)]
    for i in range(a.layers):
        b = f"blk.{i}."
        norms += [(b + "attn_norm.weight", a.hidden), (b + "ffn_norm.weight", a.hidden)]
        mats += [
            (b + "attn_q.weight", a.hidden, q),
            (b + "attn_k.weight", a.hidden, kv),
            (b + "attn_v.weight", a.hidden, kv),
            (b + "attn_output.weight", q, a.hidden),
            (b + "ffn_gate.weight", a.hidden, a.ffn),
            (b + "ffn_up.weight", a.hidden, a.ffn),
            (b + "ffn_down.weight", a.ffn, a.hidden),
        ]
    mats.append(("output.weight", a.hidden, a.vocab))
    for name, cols, _ in mats:
        if cols % Q4_K_BLOCK:
            raise SystemExit(f"{name}: {cols} columns is not a multiple of {Q4_K_BLOCK}")
    meta = [
        _str("general.architecture", "llama"),
        _str("general.name", "random-weights"),
        _u32("general.alignment", ALIGN),
        _u32("llama.block_count", a.layers),
        _u32("llama.context_length", a.ctx),
        _u32("llama.embedding_length", a.hidden),
        _u32("llama.feed_forward_length", a.ffn),
        _u32("llama.attention.head_count", a.heads),
        _u32("llama.attention.head_count_kv", a.kv_heads),
        _u32("llama.attention.key_length", hd),
        _u32("llama.attention.value_length", hd),
        _u32("llama.rope.dimension_count", hd),
        _f32("llama.rope.freq_base", 1_000_000.0),
        _f32("llama.attention.layer_norm_rms_epsilon", 1e-5),
        _u32("llama.vocab_size", a.vocab),
        _str("tokenizer.ggml.model", "llama"),
        _u32("tokenizer.ggml.bos_token_id", 1),
        _u32("tokenizer.ggml.eos_token_id", 2),
        _u32("tokenizer.ggml.unknown_token_id", 0),
        *_vocab(a.vocab),
    ]
    infos: list[bytes] = []
    offset = 0
    for name, n in norms:
        infos.append(_s(name) + struct.pack("<IQIQ", 1, n, F32, offset))
        offset += -(-n * 4 // ALIGN) * ALIGN
    for name, cols, rows in mats:
        infos.append(_s(name) + struct.pack("<IQQIQ", 2, cols, rows, Q4_K, offset))
        size = rows * cols // Q4_K_BLOCK * Q4_K_BYTES
        offset += -(-size // ALIGN) * ALIGN
    rng = np.random.default_rng(0)
    cache: dict[tuple[int, int], bytes] = {}  # same-shaped matrices share their bytes
    with path.open("wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(meta)))
        f.write(b"".join(meta) + b"".join(infos))
        _pad(f)
        for _, n in norms:
            f.write(np.ones(n, dtype=np.float32).tobytes())
            _pad(f)
        for name, cols, rows in mats:
            key = (cols, rows)
            if key not in cache:
                cache[key] = _q4k_rows(rng, cols, rows)
            f.write(cache[key])
            _pad(f)
            print(f"\r{name:<28}", end="", flush=True)
    print(f"\nwrote {path} ({path.stat().st_size / 2**30:.2f} GiB)")


def _pad(f: BinaryIO) -> None:
    f.write(b"\0" * (-f.tell() % ALIGN))


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--hidden", type=int, default=5120)
    p.add_argument("--ffn", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--vocab", type=int, default=131072)
    p.add_argument("--ctx", type=int, default=131072)
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write(args.out, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
