"""GPU memory as ggml sees it, and how many layers of a model fit into it.

llama.cpp's own fitting (`common_fit_params`) lives in its `common` library, which
llama-cpp-python does not ship, so `gpu_layers: auto` is estimated here from the file's
size and shape and the devices' free memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.engine.gguf import Shape

# Left free on the GPUs for llama.cpp's compute buffers and the driver.
RESERVE_BYTES = 1 << 30


@dataclass(frozen=True)
class Device:
    name: str
    free: int
    total: int


def gpus() -> list[Device]:
    """This machine's GPUs as ggml sees them, with their free and total memory (none on a
    CPU build; RPC workers' devices are not this machine's)."""
    from server.engine import ggml
    from server.engine.llama import _ensure_backend

    _ensure_backend()
    return [
        Device(d.name, d.free, d.total)
        for d in ggml.devices()
        if d.kind in (ggml.DEV_GPU, ggml.DEV_IGPU) and not d.remote
    ]


def fit_layers(shape: Shape, n_ctx: int, kv_type: str, free: int) -> int:
    """Layers to offload so weights and KV cache fit `free` bytes (-1: all of them).

    Each repeating layer costs its share of the file plus its KV cells; the output layer
    (llama.cpp counts it as one more) costs a layer's share of the file.
    """
    per_weights = shape.file_bytes / (shape.n_layer + 1)
    per_layer = per_weights + shape.kv_bytes(n_ctx, kv_type, layers=1)
    room = free - RESERVE_BYTES
    if room <= 0:
        return 0
    if room >= per_layer * shape.n_layer + per_weights:
        return -1
    return max(0, min(shape.n_layer, int(room // per_layer)))
