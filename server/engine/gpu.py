"""GPU memory as ggml sees it, and how many layers of a model fit into it.

llama.cpp's own fitting (`common_fit_params`) lives in its `common` library, which
llama-cpp-python does not ship, so `gpu_layers: auto` is estimated here from the file's
size and shape and the devices' free memory.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import llama_cpp

from server.engine.gguf import Shape

# Left free on the GPUs for llama.cpp's compute buffers and the driver.
RESERVE_BYTES = 1 << 30
_GPU_TYPES = (1, 2)  # ggml_backend_dev_type: GPU, integrated GPU


@dataclass(frozen=True)
class Device:
    name: str
    free: int
    total: int


def gpus() -> list[Device]:
    """The GPUs ggml can use, with their free and total memory (none on a CPU build)."""
    from server.engine.llama import _ensure_backend

    _ensure_backend()
    lib = Path(llama_cpp.__file__).parent / "lib"
    try:
        ggml = ctypes.CDLL(str(lib / "libggml.so"))
    except OSError:
        return []
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_type.restype = ctypes.c_int
    ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_name.restype = ctypes.c_char_p
    ggml.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    size_p = ctypes.POINTER(ctypes.c_size_t)
    ggml.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, size_p, size_p]
    out: list[Device] = []
    for i in range(int(ggml.ggml_backend_dev_count())):
        dev = ggml.ggml_backend_dev_get(i)
        if ggml.ggml_backend_dev_type(dev) not in _GPU_TYPES:
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        name = (ggml.ggml_backend_dev_name(dev) or b"?").decode(errors="replace")
        out.append(Device(name, int(free.value), int(total.value)))
    return out


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
