"""Model and context handles over llama-cpp-python's low-level C API.

This module and its siblings in engine/ are the only code that touches `llama_cpp`.
Every call on a context happens on the engine thread that owns it.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp.llama_cpp as lc
import numpy as np
import numpy.typing as npt

from server.engine.gguf import Shape, read_shape
from server.engine.layout import DeviceShare, LoadLog, rpc_buffers
from server.engine.types import ModelInfo
from server.errors import ModelLoadError

log = logging.getLogger("hostler.llama")

_backend_lock = threading.Lock()
_backend_ready = False


_LOAD_LOG = LoadLog()
"""What llama.cpp says of where it puts the model that loads (one at a time)."""
_load_lock = threading.Lock()


@lc.llama_log_callback  # type: ignore[untyped-decorator]
def _log_callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    # llama.cpp is chatty at load time; route it into logging at debug level.
    if text:
        line = text.decode("utf-8", errors="replace").rstrip("\n")
        _LOAD_LOG.feed(line)
        log.debug(line)


def _ensure_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            lc.llama_log_set(_log_callback, ctypes.c_void_p(0))
            lc.llama_backend_init()
            _backend_ready = True


def gpu_offload_supported() -> bool:
    """True when this llama.cpp build has a GPU backend (CUDA, Metal, ...) with a device.
    Not `llama_supports_gpu_offload()`, which is true for any build with RPC in it."""
    from server.engine.ggml import has_local_gpu

    _ensure_backend()
    return has_local_gpu()


# KV cache element types by name (their sizes: engine/gguf.py KV_BYTES).
KV_TYPES: dict[str, int] = {
    "f16": lc.GGML_TYPE_F16,
    "q8_0": lc.GGML_TYPE_Q8_0,
    "q4_0": lc.GGML_TYPE_Q4_0,
}


@dataclass(frozen=True)
class ContextOptions:
    """How to load a model and size its context."""

    n_ctx: int
    slots: int
    n_batch: int = 512
    n_ubatch: int = 512
    n_threads: int = 0
    n_gpu_layers: int = 0
    flash_attn: bool | None = None  # None: llama.cpp's auto
    kv_type: str = "f16"
    main_gpu: int = 0
    tensor_split: tuple[float, ...] = ()
    """Fractions of the model per GPU (layer split); empty: llama.cpp's default."""
    rpc: tuple[str, ...] = ()
    """RPC workers whose devices hold layers (registered before the model loads)."""
    fit_devices: bool = False
    """gpu_layers 'auto' with RPC workers: as many layers as fit every device's free
    memory, the workers' included (known only once they are registered, here)."""
    embeddings: bool = False
    """An embedding context: every token is output and pooled per sequence."""
    pooling: str | None = None
    """mean | cls | last | rank (embedding contexts); None: the GGUF's own."""


POOLING: dict[str, int] = {
    "none": lc.LLAMA_POOLING_TYPE_NONE,
    "mean": lc.LLAMA_POOLING_TYPE_MEAN,
    "cls": lc.LLAMA_POOLING_TYPE_CLS,
    "last": lc.LLAMA_POOLING_TYPE_LAST,
    "rank": lc.LLAMA_POOLING_TYPE_RANK,
}


def tokenize(vocab: Any, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
    data = text.encode("utf-8")
    n_max = len(data) + 8
    buf = (lc.llama_token * n_max)()
    n = lc.llama_tokenize(vocab, data, len(data), buf, n_max, add_special, parse_special)
    if n < 0:
        n_max = -n
        buf = (lc.llama_token * n_max)()
        n = lc.llama_tokenize(vocab, data, len(data), buf, n_max, add_special, parse_special)
    return list(buf[:n])


def to_piece(vocab: Any, token: int, *, special: bool) -> bytes:
    buf = ctypes.create_string_buffer(64)
    n = lc.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = lc.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    return buf.raw[:n]


def rerank_template(model: Any) -> str | None:
    raw = lc.llama_model_chat_template(model, b"rerank")
    return raw.decode("utf-8", errors="replace") if raw else None


def rerank_pair(model: Any, vocab: Any, query: str, document: str) -> list[int]:
    """A (query, document) pair as a reranker reads it, as llama-server builds it: the
    GGUF's rerank template, else [BOS] query [EOS] [SEP] document [EOS]."""
    template = rerank_template(model)
    if template is not None:
        text = template.replace("{query}", query).replace("{document}", document)
        return tokenize(vocab, text, add_special=False)
    eos = int(lc.llama_vocab_eos(vocab))
    if eos < 0:
        eos = int(lc.llama_vocab_sep(vocab))
    out: list[int] = []
    if lc.llama_vocab_get_add_bos(vocab):
        out.append(int(lc.llama_vocab_bos(vocab)))
    out += tokenize(vocab, query, add_special=False, parse_special=False)
    if lc.llama_vocab_get_add_eos(vocab):
        out.append(eos)
    if lc.llama_vocab_get_add_sep(vocab):
        out.append(int(lc.llama_vocab_sep(vocab)))
    out += tokenize(vocab, document, add_special=False, parse_special=False)
    if lc.llama_vocab_get_add_eos(vocab):
        out.append(eos)
    return out


class LlamaVocab:
    """A model file's vocabulary alone (no weights, no context): tokenizing for the API
    process while the model itself runs in its engine process."""

    def __init__(self, path: Path) -> None:
        _ensure_backend()
        mparams = lc.llama_model_default_params()
        mparams.vocab_only = True
        model = lc.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise ModelLoadError(f"llama.cpp could not read the vocabulary of {path.name}")
        self.model = model
        self.vocab = lc.llama_model_get_vocab(model)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self.vocab))

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return tokenize(self.vocab, text, add_special=add_special)

    def special_text(self, token: int) -> str:
        return to_piece(self.vocab, token, special=True).decode("utf-8", errors="replace")

    def rerank_pair(self, query: str, document: str) -> list[int]:
        return rerank_pair(self.model, self.vocab, query, document)

    def close(self) -> None:
        if getattr(self, "model", None):
            lc.llama_model_free(self.model)
            self.model = None


class LlamaModel:
    """One loaded model with one context of `slots` sequences on a unified KV cache."""

    def __init__(self, path: Path, options: ContextOptions) -> None:
        _ensure_backend()
        self.options = options
        self.rpc_devices: list[Any] = []
        if options.rpc:
            from server.engine.rpc import add_workers

            self.rpc_devices = add_workers(list(options.rpc))
            for d in self.rpc_devices:
                log.info("RPC device %s at %s: %d MiB free", d.name, d.description, d.free >> 20)
        self.n_gpu_layers = self._device_layers(path)
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = self.n_gpu_layers
        mparams.main_gpu = options.main_gpu
        if options.tensor_split:
            split = (ctypes.c_float * max(len(options.tensor_split), lc.llama_max_devices()))(
                *options.tensor_split
            )
            self._split = split  # llama.cpp reads it while loading
            mparams.tensor_split = split
            mparams.split_mode = lc.LLAMA_SPLIT_MODE_LAYER
        ctx = None
        with _load_lock:  # the load log is this model's alone while it loads
            _LOAD_LOG.reset()
            model = lc.llama_model_load_from_file(str(path).encode(), mparams)
            if model:
                ctx = self._new_context(model, options)
            names = rpc_buffers([(d.name, d.description) for d in self.rpc_devices])
            self.devices: tuple[DeviceShare, ...] = _LOAD_LOG.devices(names)
        if not model:
            raise ModelLoadError(f"llama.cpp could not load the model file {path.name}")
        self.model = model
        if not ctx:
            lc.llama_model_free(model)
            self.model = None
            raise ModelLoadError("llama.cpp could not create a context (out of memory?)")
        self.ctx = ctx
        self.vocab = lc.llama_model_get_vocab(model)
        self.memory = lc.llama_get_memory(ctx)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self.vocab))
        self.n_ctx = int(lc.llama_n_ctx(ctx))
        self._pieces: dict[int, bytes] = {}
        self._special_pieces: dict[int, bytes] = {}
        self._eog = np.zeros(self.n_vocab, dtype=bool)
        longest = 1
        for tok in range(self.n_vocab):
            self._eog[tok] = bool(lc.llama_vocab_is_eog(self.vocab, tok))
            longest = max(longest, len(self._to_piece(tok, special=True)))
        self.max_token_bytes = longest
        self.eog_ids = np.flatnonzero(self._eog)
        self.info = self._read_info()

    def _device_layers(self, path: Path) -> int:
        """llama.cpp's n_gpu_layers; with RPC workers and `fit_devices`, as many as fit the
        free memory of the workers' devices and this machine's GPUs together.

        llama.cpp offloads the last n layers, the output layer first, onto the devices in
        their order (workers first): the output layer, and with it the logits, is on the
        last device, a worker when this machine has no GPU."""
        options = self.options
        if not (options.rpc and options.fit_devices):
            return options.n_gpu_layers
        from server.engine.gpu import fit_layers, gpus

        local = gpus()
        shape = read_shape(path)
        free = sum(d.free for d in self.rpc_devices) + sum(d.free for d in local)
        layers = fit_layers(shape, options.n_ctx, options.kv_type, free)
        log.info(
            "gpu_layers auto -> %s of %d (%d MiB free on %d devices)",
            "all" if layers < 0 else layers, shape.n_layer + 1, free >> 20,
            len(self.rpc_devices) + len(local),
        )  # fmt: skip
        return layers

    @staticmethod
    def _new_context(model: Any, options: ContextOptions) -> Any:
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = options.n_ctx
        cparams.n_batch = options.n_batch
        cparams.n_ubatch = min(options.n_ubatch, options.n_batch)
        cparams.n_seq_max = options.slots
        if options.n_threads > 0:
            cparams.n_threads = options.n_threads
            cparams.n_threads_batch = options.n_threads
        cparams.kv_unified = True
        cparams.no_perf = True
        if options.flash_attn is not None:  # 1 enabled, 0 disabled; default -1 is auto
            cparams.flash_attn_type = 1 if options.flash_attn else 0
        if options.embeddings:
            cparams.embeddings = True
            if options.pooling is not None:
                cparams.pooling_type = POOLING[options.pooling]
        kv_type = KV_TYPES[options.kv_type]
        cparams.type_k = kv_type
        cparams.type_v = kv_type
        return lc.llama_init_from_model(model, cparams)

    @property
    def pooling(self) -> str:
        """The context's pooling (an embedding context's; 'none' otherwise)."""
        kind = int(lc.llama_pooling_type(self.ctx))
        return next((name for name, v in POOLING.items() if v == kind), "none")

    def embedding_size(self) -> int:
        """Floats per pooled output: the vector's size, or a reranker's class count."""
        if self.pooling == "rank":
            return max(1, int(lc.llama_model_n_cls_out(self.model)))
        return int(lc.llama_model_n_embd_out(self.model))

    def rerank_template(self) -> str | None:
        """The GGUF's rerank prompt (with {query} and {document}), if it has one."""
        return rerank_template(self.model)

    def rerank_pair(self, query: str, document: str) -> list[int]:
        return rerank_pair(self.model, self.vocab, query, document)

    def pooled(self, seq: int, n: int) -> npt.NDArray[np.float32] | None:
        """A copy of `seq`'s pooled output of the last decode (`n` floats); None if none."""
        ptr = lc.llama_get_embeddings_seq(self.ctx, seq)
        if not ptr:
            return None
        return np.ctypeslib.as_array(ptr, shape=(n,)).copy()

    # -- metadata -----------------------------------------------------------------

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = lc.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            lc.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def _read_info(self) -> ModelInfo:
        desc = ctypes.create_string_buffer(256)
        lc.llama_model_desc(self.model, desc, len(desc))
        bos = int(lc.llama_vocab_bos(self.vocab))
        eos = int(lc.llama_vocab_eos(self.vocab))
        shape = Shape(
            n_layer=int(lc.llama_model_n_layer(self.model)),
            n_embd=int(lc.llama_model_n_embd(self.model)),
            n_head=int(lc.llama_model_n_head(self.model)),
            n_head_kv=int(lc.llama_model_n_head_kv(self.model)),
            n_ctx_train=int(lc.llama_model_n_ctx_train(self.model)),
            file_bytes=0,
        )
        offload = self.n_gpu_layers != 0 and (bool(self.rpc_devices) or gpu_offload_supported())
        wanted = self.n_gpu_layers
        gpu_layers = 0
        if offload:
            gpu_layers = shape.n_layer + 1 if wanted < 0 else min(wanted, shape.n_layer + 1)
        return ModelInfo(
            n_ctx=self.n_ctx,
            n_ctx_train=int(lc.llama_model_n_ctx_train(self.model)),
            n_vocab=self.n_vocab,
            bos_token=self.special_text(bos) if bos >= 0 else "",
            eos_token=self.special_text(eos) if eos >= 0 else "",
            add_bos=bool(lc.llama_vocab_get_add_bos(self.vocab)),
            add_eos=bool(lc.llama_vocab_get_add_eos(self.vocab)),
            chat_template=self._meta("tokenizer.chat_template"),
            description=desc.value.decode("utf-8", errors="replace"),
            size_bytes=int(lc.llama_model_size(self.model)),
            n_params=int(lc.llama_model_n_params(self.model)),
            gpu_offload=offload,
            rpc_devices=tuple(f"{d.name} {d.description}" for d in self.rpc_devices),
            devices=self.devices,
            slots=self.options.slots,
            bos_id=bos,
            max_token_bytes=self.max_token_bytes,
            n_layer=shape.n_layer,
            gpu_layers=gpu_layers,
            kv_bytes=shape.kv_bytes(self.n_ctx, self.options.kv_type),
            kv_type=self.options.kv_type,
        )

    # -- tokens ---------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        return tokenize(self.vocab, text, add_special=add_special, parse_special=parse_special)

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes a generated token adds to the output (control tokens add nothing
        unless `special`)."""
        cache = self._special_pieces if special else self._pieces
        cached = cache.get(token)
        if cached is None:
            cached = self._to_piece(token, special=special)
            cache[token] = cached
        return cached

    def special_text(self, token: int) -> str:
        """A token's text with control tokens rendered (e.g. '<|im_end|>')."""
        return self._to_piece(token, special=True).decode("utf-8", errors="replace")

    def _to_piece(self, token: int, *, special: bool) -> bytes:
        return to_piece(self.vocab, token, special=special)

    def grammar_error(self, grammar: str) -> str | None:
        """None if llama.cpp compiles `grammar` for this vocabulary, else why not.

        Only call with a grammar that passed `check_grammar_shape`: the parser recurses.
        """
        sampler = lc.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        if not sampler:
            return "llama.cpp rejected the grammar (see the server log for where)"
        lc.llama_sampler_free(sampler)
        return None

    def is_eog(self, token: int) -> bool:
        return bool(self._eog[token])

    # -- KV cache -------------------------------------------------------------------

    def seq_rm(self, seq: int, p0: int, p1: int = -1) -> bool:
        return bool(lc.llama_memory_seq_rm(self.memory, seq, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        lc.llama_memory_seq_cp(self.memory, src, dst, p0, p1)

    def seq_add(self, seq: int, p0: int, p1: int, delta: int) -> None:
        """Shift the positions of `seq`'s cells in [p0, p1) by `delta` (RoPE re-applied)."""
        lc.llama_memory_seq_add(self.memory, seq, p0, p1, delta)

    def can_shift(self) -> bool:
        return bool(lc.llama_memory_can_shift(self.memory))

    def clear(self) -> None:
        lc.llama_memory_clear(self.memory, True)

    # -- sequence state (prompt cache) ------------------------------------------------

    def state_get(self, seq: int) -> npt.NDArray[np.uint8]:
        """A copy of `seq`'s KV cells, as llama.cpp serialises them, written straight into
        the buffer it is kept in: a state is tens of MB, and neither zeroing it first
        (bytearray, ctypes arrays) nor a second copy is free on the engine's thread."""
        size = int(lc.llama_state_seq_get_size(self.ctx, seq))
        buf = np.empty(size, dtype=np.uint8)
        dst = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        written = int(lc.llama_state_seq_get_data(self.ctx, dst, size, seq))
        return buf[:written]

    def state_set(self, seq: int, state: bytes | npt.NDArray[np.uint8]) -> bool:
        """Load a state written by `state_get` into `seq` (emptied first); False if it
        does not fit or does not parse (llama.cpp checks; nothing is left half-loaded)."""
        self.seq_rm(seq, -1, -1)
        if isinstance(state, np.ndarray):  # read in place (state_get's): no copy
            src: Any = state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        else:
            src = ctypes.cast(ctypes.c_char_p(state), ctypes.POINTER(ctypes.c_uint8))
        loaded = int(lc.llama_state_seq_set_data(self.ctx, src, len(state), seq))
        del src
        if loaded == 0:
            self.seq_rm(seq, -1, -1)
            return False
        return True

    # -- decode -----------------------------------------------------------------------

    def decode(self, batch: Batch) -> int:
        batch.struct.n_tokens = batch.n
        return int(lc.llama_decode(self.ctx, batch.struct))

    def synchronize(self) -> None:
        """Wait for the decode's work on the device (on the CPU it is done already)."""
        lc.llama_synchronize(self.ctx)

    def logits_row(self, index: int) -> npt.NDArray[np.float32]:
        """A writable view of the logits of batch position `index` (valid until next decode)."""
        ptr = lc.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def close(self) -> None:
        if getattr(self, "ctx", None):
            lc.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            lc.llama_model_free(self.model)
            self.model = None


class Batch:
    """A llama_batch whose arrays are numpy arrays we own (filled by slices, not per token)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.n = 0
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        i32p = ctypes.POINTER(ctypes.c_int32)
        base = self.seq.ctypes.data
        self._seq_ptrs = (i32p * capacity)(
            *(ctypes.cast(base + 4 * i, i32p) for i in range(capacity))
        )
        s = lc.llama_batch(
            n_tokens=0,
            token=self.token.ctypes.data_as(i32p),
            embd=None,
            pos=self.pos.ctypes.data_as(i32p),
            n_seq_id=self.n_seq_id.ctypes.data_as(i32p),
            seq_id=ctypes.cast(self._seq_ptrs, ctypes.POINTER(i32p)),
            logits=self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )
        self.struct = s

    def clear(self) -> None:
        self.n = 0

    @property
    def free(self) -> int:
        return self.capacity - self.n

    def add(self, tokens: list[int], pos0: int, seq: int, want_last_logits: bool) -> int:
        """Append tokens of one sequence; return the batch index of the last one."""
        a, b = self.n, self.n + len(tokens)
        self.token[a:b] = tokens
        self.pos[a:b] = np.arange(pos0, pos0 + len(tokens), dtype=np.int32)
        self.seq[a:b] = seq
        self.logits[a:b] = 0
        if want_last_logits:
            self.logits[b - 1] = 1
        self.n = b
        return b - 1

    def add_scored(self, tokens: list[int], pos0: int, seq: int) -> int:
        """Append tokens of one sequence, each with its logits (a token and its draft,
        to verify); return the batch index of the first."""
        a = self.n
        self.add(tokens, pos0, seq, False)
        self.logits[a : self.n] = 1
        return a
