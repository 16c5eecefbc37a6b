"""Prompt caches beyond the slots: sequence states in host RAM, spilling to disk.

Before a slot is handed to a different prompt, its sequence state (the KV cells of its
tokens, `llama_state_seq_get_data`) is saved here, keyed by those tokens. At admission
the scheduler asks for the entry with the longest common prefix with the new prompt
and restores it into a slot (`llama_state_seq_set_data`) when that beats every live
slot. Nothing here runs per token: only when a slot changes hands.

- RAM: an LRU bounded in bytes. An entry whose tokens extend another's replaces it.
- Disk: every saved entry is also written, by a background thread, to one file under
  the cache directory, in a folder named by the model file's identity and the context
  settings (a state only fits the exact model and KV layout that wrote it). Files are
  written atomically (temp file + rename) and end with a SHA-256 of their contents;
  the folder is an LRU bounded in bytes. A truncated, corrupt or foreign file is
  deleted and ignored, never loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import queue
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger("hostler.cache")
_LLAMA_VERSION = importlib.metadata.version("llama_cpp_python")

Tokens = npt.NDArray[np.int32]
State = bytes | npt.NDArray[np.uint8]
"""A sequence's KV cells as llama.cpp serialises them (an array straight from it, or the
bytes read back from disk)."""

MAGIC = b"HOSTLKV1"
_HEAD = struct.Struct("<8s32sIQ")  # magic, model key, token count, state size
_DIGEST = 32
# A sequence shorter than this is cheaper to prefill again than to save and restore.
MIN_TOKENS = 32


def common_prefix(a: Tokens, b: Tokens) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def tokens_key(tokens: Tokens) -> str:
    return hashlib.sha256(tokens.tobytes()).hexdigest()[:32]


def extends(longer: Tokens, shorter: Tokens) -> bool:
    """True if `shorter` is a prefix of `longer` (the longer entry serves both)."""
    return len(shorter) <= len(longer) and common_prefix(longer, shorter) == len(shorter)


@dataclass(eq=False)
class Entry:
    tokens: Tokens
    size: int  # bytes of state
    state: State | None = None  # in RAM; None for a disk-only entry
    path: Path | None = None


@dataclass
class TierStats:
    entries: int = 0
    bytes: int = 0
    limit_bytes: int = 0
    hits: int = 0
    saves: int = 0
    evictions: int = 0
    rejected: int = 0  # disk: files ignored as corrupt, truncated or foreign

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class DiskTier:
    """Entry files in one folder per model identity, written by a background thread."""

    def __init__(self, folder: Path, model_key: bytes, limit_bytes: int) -> None:
        self.folder = folder
        self.model_key = model_key
        self.limit = limit_bytes
        self.stats = TierStats(limit_bytes=limit_bytes)
        self._lock = threading.Lock()
        self._index: OrderedDict[str, Entry] = OrderedDict()  # least recent first
        self._queue: queue.Queue[tuple[str, Tokens, State] | None] = queue.Queue()
        # The entries hold recent prompts (as tokens): readable by this user only.
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._scan()
        self._writer = threading.Thread(target=self._write_loop, name="hostler-cache-disk")
        self._writer.daemon = True
        self._writer.start()

    # -- index -------------------------------------------------------------------

    def _scan(self) -> None:
        """Index the folder's entries by their headers (tokens); sweep leftovers."""
        found: list[tuple[float, str, Entry]] = []
        for path in self.folder.iterdir():
            if path.suffix == ".tmp":
                path.unlink(missing_ok=True)  # a write cut short by a crash
                continue
            if path.suffix != ".kv":
                continue
            entry = self._read_header(path)
            if entry is None:
                self._reject(path)
                continue
            found.append((path.stat().st_mtime, path.stem, entry))
        for _, name, entry in sorted(found, key=lambda t: t[0]):
            self._index[name] = entry
            self.stats.bytes += entry.size
        self.stats.entries = len(self._index)
        self._evict()

    def _read_header(self, path: Path) -> Entry | None:
        try:
            with path.open("rb") as f:
                head = f.read(_HEAD.size)
                if len(head) != _HEAD.size:
                    return None
                magic, key, n_tokens, n_state = _HEAD.unpack(head)
                if magic != MAGIC or key != self.model_key:
                    return None
                expected = _HEAD.size + 4 * n_tokens + n_state + _DIGEST
                if path.stat().st_size != expected:
                    return None
                tokens = np.frombuffer(f.read(4 * n_tokens), dtype=np.int32).copy()
        except OSError:
            return None
        return Entry(tokens=tokens, size=int(path.stat().st_size), path=path)

    def _reject(self, path: Path) -> None:
        log.warning("prompt cache: ignoring unusable file %s", path.name)
        self.stats.rejected += 1
        path.unlink(missing_ok=True)

    def candidates(self) -> list[Entry]:
        with self._lock:
            return list(self._index.values())

    def load(self, entry: Entry) -> State | None:
        """The entry's state, verified; None (and the file removed) if it is unusable."""
        assert entry.path is not None
        try:
            data = entry.path.read_bytes()
        except OSError:
            data = b""
        body, digest = data[:-_DIGEST], data[-_DIGEST:]
        ok = len(data) > _HEAD.size + _DIGEST and hashlib.sha256(body).digest() == digest
        if ok:
            magic, key, n_tokens, n_state = _HEAD.unpack_from(body)
            start = _HEAD.size + 4 * n_tokens
            ok = (
                magic == MAGIC
                and key == self.model_key
                and len(body) == start + n_state
                and np.array_equal(np.frombuffer(body[_HEAD.size : start], np.int32), entry.tokens)
            )
        with self._lock:
            name = entry.path.stem
            if not ok:
                if self._index.pop(name, None) is not None:
                    self.stats.bytes -= entry.size
                    self.stats.entries = len(self._index)
                self._reject(entry.path)
                return None
            if name in self._index:
                self._index.move_to_end(name)
            self.stats.hits += 1
        os.utime(entry.path)  # recency survives a restart
        return body[start:]

    # -- writing -----------------------------------------------------------------

    def put(self, tokens: Tokens, state: State) -> None:
        """Queue an entry for writing (the caller never waits on the disk)."""
        size = _HEAD.size + 4 * len(tokens) + len(state) + _DIGEST
        if size <= self.limit:
            self._queue.put((tokens_key(tokens), tokens, state))

    def flush(self) -> None:
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(timeout=120)

    def _write_loop(self) -> None:
        # Hash, write and fsync at the lowest priority: on a machine whose cores all
        # decode, a writer at equal priority stalls every step of llama.cpp's threads.
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(*item)
            except Exception:
                log.exception("prompt cache: could not write an entry")
            finally:
                self._queue.task_done()

    def _write(self, name: str, tokens: Tokens, state: State) -> None:
        path = self.folder / f"{name}.kv"
        if path.exists():
            return
        head = _HEAD.pack(MAGIC, self.model_key, len(tokens), len(state))
        digest = hashlib.sha256()
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            body = state if isinstance(state, bytes) else state.data
            for part in (head, tokens.astype(np.int32).tobytes(), body):
                digest.update(part)
                f.write(part)
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        entry = Entry(tokens=tokens, size=path.stat().st_size, path=path)
        with self._lock:
            self._drop_covered(tokens)
            self._index[name] = entry
            self.stats.bytes += entry.size
            self.stats.saves += 1
            self._evict()
            self.stats.entries = len(self._index)

    def _drop_covered(self, tokens: Tokens) -> None:
        """Remove entries whose tokens are a prefix of `tokens` (the new one covers them)."""
        for name, e in list(self._index.items()):
            if extends(tokens, e.tokens):
                self._remove(name)

    def _evict(self) -> None:
        while self.stats.bytes > self.limit and self._index:
            self._remove(next(iter(self._index)))
            self.stats.evictions += 1

    def _remove(self, name: str) -> None:
        e = self._index.pop(name)
        self.stats.bytes -= e.size
        if e.path is not None:
            e.path.unlink(missing_ok=True)


class PromptCache:
    """The RAM tier, with an optional disk tier behind it. Engine thread only."""

    def __init__(self, ram_bytes: int, disk: DiskTier | None = None) -> None:
        self.limit = ram_bytes
        self.disk = disk
        self.ram: OrderedDict[str, Entry] = OrderedDict()
        self.stats = TierStats(limit_bytes=ram_bytes)

    def covers(self, tokens: Tokens) -> bool:
        """True if an entry already holds `tokens` (or a continuation of them)."""
        return any(extends(e.tokens, tokens) for e in self.ram.values())

    def save(self, tokens: Tokens, state: State) -> None:
        if len(tokens) < MIN_TOKENS or self.covers(tokens):
            return
        for name, e in list(self.ram.items()):  # the new entry extends these
            if extends(tokens, e.tokens):
                self._drop(name)
        self.stats.saves += 1
        if self.disk is not None:
            self.disk.put(tokens, state)
        self._put(tokens, state)

    def _put(self, tokens: Tokens, state: State) -> None:
        """Keep `state` in RAM (if it fits at all), evicting the least recent entries."""
        if len(state) > self.limit:
            return
        self.ram[tokens_key(tokens)] = Entry(tokens=tokens, size=len(state), state=state)
        self.stats.bytes += len(state)
        while self.stats.bytes > self.limit:
            self._drop(next(iter(self.ram)))
            self.stats.evictions += 1
        self.stats.entries = len(self.ram)

    def _drop(self, name: str) -> None:
        e = self.ram.pop(name)
        self.stats.bytes -= e.size
        self.stats.entries = len(self.ram)

    def best(self, prompt: Tokens) -> tuple[int, Entry | None]:
        """The entry sharing the longest prefix with `prompt`, RAM first, then disk."""
        best_n, best = 0, None
        for e in self.ram.values():
            n = common_prefix(e.tokens, prompt)
            if n > best_n:
                best_n, best = n, e
        if self.disk is not None:
            for e in self.disk.candidates():
                n = common_prefix(e.tokens, prompt)
                if n > best_n:
                    best_n, best = n, e
        return best_n, best

    def state_of(self, entry: Entry) -> State | None:
        """The entry's state (a disk entry is read, verified and moved into RAM)."""
        if entry.state is not None:
            self.stats.hits += 1
            name = tokens_key(entry.tokens)
            if name in self.ram:
                self.ram.move_to_end(name)
            return entry.state
        assert self.disk is not None
        state = self.disk.load(entry)
        if state is not None:
            self._put(entry.tokens, state)
        return state

    def health(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ram": self.stats.as_dict()}
        if self.disk is not None:
            out["disk"] = self.disk.stats.as_dict()
        return out

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()


def model_key(path: Path, settings: dict[str, Any]) -> bytes:
    """A model file's identity plus the context settings that shape its KV state."""
    st = path.stat()
    ident = f"{path.name}|{st.st_size}|{st.st_mtime_ns}|llama-cpp-python {_LLAMA_VERSION}|"
    ident += "|".join(f"{k}={settings[k]}" for k in sorted(settings))
    return hashlib.sha256(ident.encode()).digest()


def open_cache(
    path: Path, settings: dict[str, Any], *, ram_mib: int, disk_gib: float, folder: Path
) -> PromptCache | None:
    """The prompt cache for one loaded model, or None when both tiers are off."""
    if ram_mib <= 0 and disk_gib <= 0:
        return None
    disk = None
    if disk_gib > 0:
        key = model_key(path, settings)
        try:
            disk = DiskTier(folder / key.hex()[:24], key, int(disk_gib * 2**30))
        except OSError as exc:
            log.warning("prompt cache: no disk tier (%s)", exc)
    return PromptCache(ram_mib * 2**20, disk)
