"""The CPU check behind the engine's crash message: the same CMake flags as
scripts/_env.sh, and a hint only for a crash a build this CPU cannot run explains."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from server.engine import cpu

ROOT = Path(__file__).resolve().parents[2]


def test_cmake_args_match_the_install_script() -> None:
    script = f"source {ROOT}/scripts/_env.sh; unset CMAKE_ARGS; llama_cmake_args"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert cpu.cmake_args() == out.stdout.strip()


def test_cmake_args_for_a_cpu_with_amx() -> None:
    args = cpu.cmake_args({"amx_tile", "avx2", "fma", "avx512f"})
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AMX_INT8=OFF" in args
    assert "-DGGML_AVX2=ON" in args and "-DGGML_AVX512=ON" in args and "-DGGML_AVX_VNNI=OFF" in args
    assert "-DGGML_RPC=ON" in args
    assert cpu.cmake_args({"avx2"}) == "-DGGML_RPC=ON"  # no AMX: native is right


def test_crash_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "risky_features", lambda: ["AMX_INT8"])
    hint = cpu.crash_hint(-signal.SIGILL)
    assert hint and "CPU features this machine cannot run" in hint
    assert "pip install --force-reinstall" in hint and "llama-cpp-python==" in hint
    assert cpu.crash_hint(-signal.SIGKILL) is None and cpu.crash_hint(1) is None
    monkeypatch.setattr(cpu, "risky_features", lambda: [])
    assert cpu.crash_hint(-signal.SIGSEGV) is None  # a build that fits: another cause


def test_version_is_the_pinned_one() -> None:
    assert f'LLAMA_CPP_VERSION="{cpu.LLAMA_CPP_VERSION}"' in (ROOT / "scripts/_env.sh").read_text()
    assert f'"llama-cpp-python=={cpu.LLAMA_CPP_VERSION}"' in (ROOT / "pyproject.toml").read_text()


def test_this_build_runs_here() -> None:
    assert "AMX_INT8" not in cpu.risky_features()  # scripts/_env.sh built it without AMX


def test_a_build_with_rpc_is_not_a_gpu_here() -> None:
    # llama_supports_gpu_offload() is true for any build with the RPC backend; the
    # server asks the devices (this machine has no GPU: CPU defaults stay).
    from server.engine import ggml
    from server.engine.llama import gpu_offload_supported

    kinds = {d.kind for d in ggml.devices()}
    assert ggml.DEV_CPU in kinds
    assert gpu_offload_supported() == ggml.has_local_gpu()
    if not (kinds & {ggml.DEV_GPU, ggml.DEV_IGPU}):
        assert not gpu_offload_supported()
