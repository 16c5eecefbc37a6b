"""ggml's backend device registry (`ggml-backend.h`), which llama-cpp-python does not
bind: which devices this build and its registered backends offer.

`llama_supports_gpu_offload()` is true whenever the build has the RPC backend, even
with no worker registered and no GPU at all, so "is there a GPU" is asked of the
devices themselves.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

# enum ggml_backend_dev_type
DEV_CPU, DEV_GPU, DEV_IGPU, DEV_ACCEL, DEV_META = range(5)


def _loaded_path(folder: Path) -> Path | None:
    """The libggml file this process already mapped (libllama's dependency, by its
    soname): opening it by another name (the unversioned symlink) would load a second
    copy with a registry of its own, whose devices llama.cpp never sees."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = Path(line.split()[-1]) if line.count("/") else None
        if path and path.parent == folder and path.name.startswith("libggml.so"):
            return path
    return None


@functools.cache
def lib() -> ctypes.CDLL:
    """libggml as llama-cpp-python loaded it (the same copy: its registry is shared)."""
    import llama_cpp.llama_cpp  # loads libllama and, with it, libggml

    folder = Path(llama_cpp.__file__).parent / "lib"
    names = ("libggml.so.0", "libggml.0.dylib", "libggml.dylib", "ggml.dll", "libggml.so")
    path = _loaded_path(folder) or next((folder / n for n in names if (folder / n).exists()), None)
    if path is None:  # pragma: no cover - a build laid out differently
        raise OSError(f"libggml not found under {folder}")
    g = ctypes.CDLL(str(path))
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    g.ggml_backend_dev_count.restype = sz
    g.ggml_backend_dev_get.argtypes, g.ggml_backend_dev_get.restype = [sz], vp
    g.ggml_backend_dev_type.argtypes, g.ggml_backend_dev_type.restype = [vp], ctypes.c_int
    g.ggml_backend_dev_name.argtypes, g.ggml_backend_dev_name.restype = [vp], ctypes.c_char_p
    g.ggml_backend_dev_description.argtypes = [vp]
    g.ggml_backend_dev_description.restype = ctypes.c_char_p
    g.ggml_backend_dev_memory.argtypes = [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)]
    g.ggml_backend_dev_memory.restype = None
    g.ggml_backend_dev_by_name.argtypes, g.ggml_backend_dev_by_name.restype = [ctypes.c_char_p], vp
    g.ggml_backend_dev_by_type.argtypes, g.ggml_backend_dev_by_type.restype = [ctypes.c_int], vp
    g.ggml_backend_reg_by_name.argtypes, g.ggml_backend_reg_by_name.restype = [ctypes.c_char_p], vp
    g.ggml_backend_reg_get_proc_address.argtypes = [vp, ctypes.c_char_p]
    g.ggml_backend_reg_get_proc_address.restype = vp
    g.ggml_backend_register.argtypes, g.ggml_backend_register.restype = [vp], None
    return g


def backend() -> ctypes.CDLL:
    """`lib()` once llama.cpp's backends are initialised (their devices registered)."""
    from server.engine.llama import _ensure_backend

    _ensure_backend()
    return lib()


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    kind: int
    free: int
    total: int

    @property
    def remote(self) -> bool:
        return self.name.startswith("RPC")


def devices() -> list[Device]:
    """Every device of every registered backend (CPU, GPUs, RPC workers added so far)."""
    g = backend()
    out = []
    for i in range(g.ggml_backend_dev_count()):
        dev = g.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        g.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append(
            Device(
                name=(g.ggml_backend_dev_name(dev) or b"").decode(),
                description=(g.ggml_backend_dev_description(dev) or b"").decode(),
                kind=int(g.ggml_backend_dev_type(dev)),
                free=int(free.value),
                total=int(total.value),
            )
        )
    return out


def has_local_gpu() -> bool:
    """True when a GPU of this machine is a device (CUDA, Metal, Vulkan, ...)."""
    return any(d.kind in (DEV_GPU, DEV_IGPU) and not d.remote for d in devices())
