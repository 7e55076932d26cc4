#!/usr/bin/env bash
# Create (or reuse) the virtual environment and build carprune into it against torch's CPU wheel.
# Source it: `source scripts/env.sh`. The venv lives outside the clone (a reusable cache):
# $CARPRUNE_VENV, default ~/.cache/carprune/venv-cpu.
set -euo pipefail
_here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARPRUNE_VENV="${CARPRUNE_VENV:-$HOME/.cache/carprune/venv-cpu}"
_py="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x "$CARPRUNE_VENV/bin/python" ]; then
  echo "[carprune] creating venv $CARPRUNE_VENV" >&2
  "$_py" -m venv "$CARPRUNE_VENV"
fi
_pip() { "$CARPRUNE_VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
# torch first: the extension builds against the torch installed here (never an isolated build).
_pip install -q "torch==2.13.0" numpy "scikit-build-core>=0.10" pybind11 "cmake>=3.26" ninja \
  pillow tqdm matplotlib bitarray pytest pytest-benchmark ruff
_pip install -q --no-build-isolation "$_here"
export PATH="$CARPRUNE_VENV/bin:$PATH"
set +euo pipefail
