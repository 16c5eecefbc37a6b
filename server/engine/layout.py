"""Where llama.cpp put a model: layers and MiB per device, read from its own load log.

llama.cpp decides the layer split while it loads (by tensor_split, or by each device's
free memory) and says what it decided only in its log: a debug line per layer ("layer 3
assigned to device RPC0") and a line per buffer ("RPC0[10.0.0.2:50052] model buffer
size = 40.50 MiB", "... KV buffer size = ..."). `LoadLog` collects those lines while one
model loads; `devices()` sums them per device, in the order the devices first appear.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

_LAYER = re.compile(r"layer\s+(\d+) assigned to device (\S+?),")
_BUFFER = re.compile(r"(\S+) (?:model|KV) buffer size =\s*([\d.]+) MiB")
"""Weights and KV cache; compute buffers are scratch, not the model."""


@dataclass(frozen=True)
class DeviceShare:
    """One device's part of a loaded model."""

    device: str
    layers: int
    bytes: int
    output: bool = False
    """It holds the output layer (and so computes the logits)."""
    worker: str | None = None
    """The RPC worker (host:port) whose device it is; None for this machine's."""

    def describe(self) -> str:
        where = f" ({self.worker})" if self.worker else ""
        layers = f"{self.layers} layer{'s' if self.layers != 1 else ''}"
        out = " + output" if self.output else ""
        return f"{self.device}{where} {layers}{out} {self.bytes / 2**20:.0f} MiB"


def rpc_buffers(devices: list[tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """Buffer name -> (device, worker) for RPC devices given as (name, host:port) in
    registration order: a worker's k-th device is "RPC<global>" but its buffers are named
    "RPC<k>[host:port]" (ggml-rpc's names)."""
    out: dict[str, tuple[str, str]] = {}
    seen: dict[str, int] = {}
    for name, endpoint in devices:
        k = seen.get(endpoint, 0)
        seen[endpoint] = k + 1
        out[f"RPC{k}[{endpoint}]"] = (name, endpoint)
        out[name] = (name, endpoint)
    return out


def device_of(buffer: str) -> str:
    """The device a buffer lives on: host buffers (CPU_Mapped, CPU_REPACK, CUDA_Host, ...)
    are the CPU's."""
    if buffer.startswith("CPU") or buffer.endswith("_Host"):
        return "CPU"
    return buffer


class LoadLog:
    """llama.cpp's log lines about placement, while one model loads (one at a time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._layers: dict[int, str] = {}
        self._bytes: dict[str, float] = {}
        self._order: list[str] = []
        self.n_layer = 0

    def reset(self, n_layer: int = 0) -> None:
        with self._lock:
            self._layers.clear()
            self._bytes.clear()
            self._order.clear()
            self.n_layer = n_layer

    def feed(self, line: str) -> None:
        if "assigned to device" in line:
            m = _LAYER.search(line)
            if m:
                with self._lock:
                    self._layers[int(m.group(1))] = m.group(2)
                    self._see(m.group(2))
        elif "buffer size" in line:
            m = _BUFFER.search(line)
            if m:
                device = device_of(m.group(1))
                with self._lock:
                    self._bytes[device] = self._bytes.get(device, 0.0) + float(m.group(2)) * 2**20
                    self._see(device)

    def _see(self, device: str) -> None:
        if device not in self._order:
            self._order.append(device)

    def devices(self, rpc: dict[str, tuple[str, str]] | None = None) -> tuple[DeviceShare, ...]:
        """Layers (the output layer counted, as llama.cpp does) and bytes (weights and KV
        cache) per device; `rpc` (from `rpc_buffers`) names the workers' devices."""
        rpc = rpc or {}
        layers: dict[str, int] = {}
        sizes: dict[str, float] = {}
        order: list[str] = []
        with self._lock:
            output = self._layers.get(max(self._layers)) if self._layers else None
            output = rpc.get(output, (output, ""))[0] if output else None
            for name in self._order:
                device = rpc.get(name, (name, ""))[0]
                if device not in order:
                    order.append(device)
                layers[device] = layers.get(device, 0) + sum(
                    1 for d in self._layers.values() if d == name
                )
                sizes[device] = sizes.get(device, 0.0) + self._bytes.get(name, 0.0)
        workers = {device: endpoint for device, endpoint in rpc.values()}
        return tuple(
            DeviceShare(
                device,
                layers[device],
                int(sizes[device]),
                output=device == output,
                worker=workers.get(device),
            )
            for device in order
        )
