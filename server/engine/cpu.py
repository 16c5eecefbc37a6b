"""What the llama.cpp build asks of the CPU, and what to say when the CPU cannot give it.

A plain `pip install` builds llama.cpp with -march=native. On a VM whose CPU reports AMX
(or AVX-512) that the hypervisor does not run, the first real matmul dies with SIGILL or
SIGSEGV. The engine process runs a short decode at load, so such a build dies there;
`crash_hint` then names the cause and the reinstall command `scripts/_env.sh` would use.
"""

from __future__ import annotations

import functools
import signal

LLAMA_CPP_VERSION = "0.3.36"  # keep in step with pyproject.toml and scripts/_env.sh

RPC = "-DGGML_RPC=ON"  # every build: models split over `rpc:` workers

# /proc/cpuinfo flag -> ggml's CMake switch (the pairs scripts/_env.sh uses).
_FLAGS = [
    ("sse4_2", "SSE42"), ("f16c", "F16C"), ("fma", "FMA"), ("bmi2", "BMI2"), ("avx", "AVX"),
    ("avx2", "AVX2"), ("avx_vnni", "AVX_VNNI"), ("avx512f", "AVX512"),
    ("avx512vbmi", "AVX512_VBMI"), ("avx512_vnni", "AVX512_VNNI"),
    ("avx512_bf16", "AVX512_BF16"),
]  # fmt: skip

# Features in llama.cpp's system info that this machine's flags must report.
_NEEDS = {
    "AVX": "avx", "AVX2": "avx2", "AVX_VNNI": "avx_vnni", "F16C": "f16c", "FMA": "fma",
    "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8", "AMX_BF16": "amx_bf16",
}  # fmt: skip


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def build_features() -> set[str]:
    """The CPU features this llama.cpp build uses (from llama_print_system_info)."""
    import llama_cpp.llama_cpp as lc

    info = lc.llama_print_system_info().decode("utf-8", errors="replace")
    out: set[str] = set()
    for part in info.replace("|", "\n").splitlines():
        name, _, value = part.partition("=")
        if value.strip() == "1":
            out.add(name.split(":")[-1].strip())
    return out


def risky_features() -> list[str]:
    """Features the build uses that this CPU does not report, or AMX (which VMs report
    and often cannot run)."""
    flags = cpu_flags()
    if not flags:
        return []
    built = build_features()
    missing = [f for f, flag in _NEEDS.items() if f in built and flag not in flags]
    amx = [f for f in built if f.startswith("AMX")]
    return sorted(set(missing + amx))


def cmake_args(flags: set[str] | None = None) -> str:
    """The CMake flags scripts/_env.sh builds with: ggml's RPC backend, and native unless
    the CPU reports AMX; then its own features minus AMX."""
    flags = cpu_flags() if flags is None else flags
    if "amx_tile" not in flags:
        return RPC
    args = [
        RPC,
        "-DGGML_NATIVE=OFF",
        "-DGGML_AMX_TILE=OFF",
        "-DGGML_AMX_INT8=OFF",
        "-DGGML_AMX_BF16=OFF",
    ]
    for flag, name in _FLAGS:
        args.append(f"-DGGML_{name}={'ON' if flag in flags else 'OFF'}")
    return " ".join(args)


def reinstall_command() -> str:
    args = cmake_args()
    if args == RPC:  # a native build crashed: build for the features this CPU reports
        args = f"{RPC} -DGGML_NATIVE=OFF"
    return (
        f'CMAKE_ARGS="{args}" pip install --force-reinstall --no-cache-dir --no-deps'
        f" llama-cpp-python=={LLAMA_CPP_VERSION}"
    )


def crash_hint(code: int | None) -> str | None:
    """For an engine process killed by SIGILL/SIGSEGV/SIGBUS with a build this CPU may
    not run: the cause and the fix, in one line."""
    if code is None or -code not in (signal.SIGILL, signal.SIGSEGV, signal.SIGBUS):
        return None
    risky = risky_features()
    if not risky:
        return None
    return (
        "llama.cpp was built for CPU features this machine cannot run"
        f" ({', '.join(risky)}); reinstall it with: {reinstall_command()}"
    )
