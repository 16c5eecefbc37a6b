"""ggml's RPC backend: a model's layers on other machines' devices.

- `serve_worker` runs ggml's RPC server (`ggml_backend_rpc_start_server`, what
  llama.cpp's `rpc-server` runs) from the same libggml as the server, so the protocol
  always matches (a client refuses a server of another major version). It blocks.
- `add_workers` registers each worker's devices (`ggml_backend_rpc_add_server`, then
  `ggml_backend_register`, as llama.cpp's `common/arg.cpp` does for `--rpc`) before a
  model loads; llama.cpp then counts them among its GPU devices. A worker that does not
  answer is a clear error here: ggml itself aborts the process on a failed connect.

The RPC protocol has no authentication: a worker must only ever listen on loopback or a
private network (a tunnel for anything else). Each worker serves one client at a time.
"""

from __future__ import annotations

import ctypes
import logging
import socket
from pathlib import Path

from server.engine import ggml
from server.errors import ModelLoadError

log = logging.getLogger("hostler.rpc")

DEFAULT_PORT = 50052
CONNECT_TIMEOUT = 5.0

_ADD = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)
_START = ctypes.CFUNCTYPE(
    None,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_size_t,
    ctypes.c_size_t,
    ctypes.POINTER(ctypes.c_void_p),
)


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' (an IPv6 host in brackets) -> (host, port); ValueError if not one."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not host:port: {endpoint!r}")
    return host.strip("[]"), int(port)


def _proc(name: str) -> int:
    g = ggml.backend()
    reg = g.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise ModelLoadError(
            "this llama.cpp build has no RPC backend: rebuild it with -DGGML_RPC=ON"
            " (scripts/_env.sh does)"
        )
    addr = g.ggml_backend_reg_get_proc_address(reg, name.encode())
    if not addr:
        raise ModelLoadError(f"the RPC backend has no {name}")
    return int(addr)


def probe(endpoint: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Raise ModelLoadError naming `endpoint` unless something listens there."""
    host, port = split_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise ModelLoadError(f"RPC worker {endpoint} is unreachable: {exc}") from exc


def add_workers(endpoints: list[str]) -> list[ggml.Device]:
    """Register every worker's devices (each checked to answer first); the devices
    added, in order."""
    for ep in endpoints:
        probe(ep)
    add = _ADD(_proc("ggml_backend_rpc_add_server"))
    g = ggml.backend()
    before = {d.name for d in ggml.devices()}
    for ep in endpoints:
        reg = add(ep.encode())
        if not reg:
            raise ModelLoadError(f"RPC worker {ep} offers no device")
        g.ggml_backend_register(reg)
    return [d for d in ggml.devices() if d.name not in before]


def worker_devices(names: list[str]) -> list[int]:
    """ggml device handles for a worker: the named ones, else every GPU, else the CPU."""
    g = ggml.backend()
    handles: list[int] = []
    if names:
        for name in names:
            dev = g.ggml_backend_dev_by_name(name.encode())
            if not dev:
                known = ", ".join(d.name for d in ggml.devices())
                raise ModelLoadError(f"no device {name!r} here (devices: {known})")
            handles.append(int(dev))
        return handles
    for i in range(g.ggml_backend_dev_count()):
        dev = g.ggml_backend_dev_get(i)
        if g.ggml_backend_dev_type(dev) in (ggml.DEV_GPU, ggml.DEV_IGPU):
            handles.append(int(dev))
    if not handles:
        handles.append(int(g.ggml_backend_dev_by_type(ggml.DEV_CPU)))
    return handles


def serve_worker(
    host: str, port: int, threads: int, devices: list[str], cache_dir: Path | None
) -> None:
    """Serve this machine's devices to one RPC client at a time, until killed."""
    handles = worker_devices(devices)
    start = _START(_proc("ggml_backend_rpc_start_server"))
    array = (ctypes.c_void_p * len(handles))(*handles)
    cache = None
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache = str(cache_dir).encode()
    endpoint = f"{host}:{port}".encode()
    start(endpoint, cache, threads, len(handles), array)
