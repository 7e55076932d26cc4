#!/usr/bin/env bash
# Create (or reuse) a virtual environment with torch, and build carprune into it against that torch.
# Source it: `source scripts/env.sh`. The venv lives outside the clone (a reusable cache).
#
#   CARPRUNE_TORCH=cpu (default)  torch 2.13.0 + torchvision 0.28.0, CPU builds, from PyTorch's CPU
#                  wheel index (https://download.pytorch.org/whl/cpu; about 200 MB to download).
#                  When that index cannot be reached (this project's machines reach PyPI only), it
#                  says so and installs torch==2.13.0 from the default index, without torchvision.
#   CARPRUNE_TORCH=cuda           torch 2.14.1 + torchvision 0.29.1 from PyPI: CUDA 13 builds (about
#                  several GB to download, 6 GB installed; they run on a CPU too). Building carprune
#                  against them needs the CUDA toolkit (nvcc; CUDA_TOOLKIT_ROOT_DIR, default
#                  /usr/local/cuda) and builds the CUDA kernels too (TORCH_CUDA_ARCH_LIST, "8.0;9.0").
#   CARPRUNE_VENV  the venv; default $CARPRUNE_CACHE/venv-cpu (or venv-cuda), where CARPRUNE_CACHE
#                  defaults to $XDG_CACHE_HOME/carprune, else ~/.cache/carprune.
#   PYTHON         the interpreter that creates the venv (default python3.11, else python3).
set -euo pipefail
_cp_here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARPRUNE_TORCH="${CARPRUNE_TORCH:-cpu}"
_cp_cache="${CARPRUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/carprune}"
_cp_cpu_index="https://download.pytorch.org/whl/cpu"
case "$CARPRUNE_TORCH" in
  cpu) _cp_torch=2.13.0 _cp_vision=0.28.0 ;;
  cuda) _cp_torch=2.14.1 _cp_vision=0.29.1 ;;
  *) echo "[carprune] error: CARPRUNE_TORCH must be cpu or cuda, got '$CARPRUNE_TORCH'" >&2
     return 2 2>/dev/null || exit 2 ;;
esac
CARPRUNE_VENV="${CARPRUNE_VENV:-$_cp_cache/venv-$CARPRUNE_TORCH}"
_cp_t0=$SECONDS
_cp_say() { echo "[carprune +$((SECONDS - _cp_t0))s] $*" >&2; }
_cp_pip() { "$CARPRUNE_VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

if [ ! -x "$CARPRUNE_VENV/bin/python" ]; then
  _cp_py="${PYTHON:-$(command -v python3.11 || command -v python3)}"
  _cp_say "creating venv $CARPRUNE_VENV ($("$_cp_py" --version 2>&1); a few seconds)"
  "$_cp_py" -m venv "$CARPRUNE_VENV"
fi

# torch first: the extension builds against the torch installed here (never an isolated build).
# Installed versions come from the package metadata (importing torch would take seconds).
read -r _cp_has_torch _cp_has_vision < <("$CARPRUNE_VENV/bin/python" - <<'PY'
from importlib import metadata
def v(name):
    try:
        return metadata.version(name).split("+")[0]
    except metadata.PackageNotFoundError:
        return "-"
print(v("torch"), v("torchvision"))
PY
)
if [ "$_cp_has_torch" = "$_cp_torch" ] && [ "$_cp_has_vision" = "$_cp_vision" ]; then
  _cp_say "venv $CARPRUNE_VENV: torch $_cp_torch + torchvision $_cp_vision ($CARPRUNE_TORCH) already installed"
elif [ "$CARPRUNE_TORCH" = cuda ]; then
  _cp_say "installing torch $_cp_torch + torchvision $_cp_vision (CUDA 13 builds from PyPI: several GB" \
          "to download, 6 GB installed; 1 min on a fast mirror, 5-10 min on a typical connection)"
  _cp_pip install -q "torch==$_cp_torch" "torchvision==$_cp_vision"
# A short probe, so that a machine without access to the index does not wait for pip's retries.
elif "$CARPRUNE_VENV/bin/python" -c "import urllib.request as u; u.urlopen('$_cp_cpu_index/torch/', timeout=5)" \
     >/dev/null 2>&1; then
  _cp_say "installing torch $_cp_torch + torchvision $_cp_vision (CPU builds from $_cp_cpu_index:" \
          "about 200 MB to download, 1.5 GB installed; about 1 min)"
  _cp_pip install -q --index-url "$_cp_cpu_index" "torch==$_cp_torch" "torchvision==$_cp_vision"
elif [ "$_cp_has_torch" = "$_cp_torch" ]; then
  _cp_say "venv $CARPRUNE_VENV: torch $_cp_torch already installed, without torchvision (PyTorch's CPU" \
          "wheel index, $_cp_cpu_index, cannot be reached)"
else
  _cp_say "PyTorch's CPU wheel index ($_cp_cpu_index) cannot be reached: installing torch==$_cp_torch" \
          "from the default index instead (without torchvision; with only PyPI, that is the multi-GB" \
          "CUDA build unless a local CPU wheel is configured, as on this project's machines)"
  _cp_pip install -q "torch==$_cp_torch"
fi

_cp_say "installing build tools and test dependencies (numpy, cmake, ninja, pytest, ruff, onnx, ...;" \
        "seconds when present, about 30 s otherwise)"
# onnx and onnxscript: torch.onnx.export's default exporter needs both (tests/test_prune_units.py
# exports a pruned network and runs the file with onnx's reference evaluator)
_cp_pip install -q numpy "scikit-build-core>=0.10" pybind11 "cmake>=3.26" ninja \
  pillow tqdm matplotlib bitarray scipy pytest pytest-benchmark ruff onnx onnxscript

# Each venv keeps its own build directory (a no-op rebuild takes seconds): builds against two
# torches must not share one, as they would in the tree's build/<wheel tag>.
_cp_build="$CARPRUNE_VENV/carprune-build/$(echo "$_cp_here" | cksum | cut -d' ' -f1)"
_cp_cmake="${CMAKE_ARGS:-}"
if [ "$CARPRUNE_TORCH" = cuda ]; then
  export CUDA_TOOLKIT_ROOT_DIR="${CUDA_TOOLKIT_ROOT_DIR:-/usr/local/cuda}"
  export CUDACXX="${CUDACXX:-$CUDA_TOOLKIT_ROOT_DIR/bin/nvcc}"
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
  if [ ! -x "$CUDACXX" ]; then
    _cp_say "error: building carprune against torch's CUDA build needs the CUDA toolkit; no nvcc at" \
            "$CUDACXX (set CUDA_TOOLKIT_ROOT_DIR or CUDACXX)"
    return 1 2>/dev/null || exit 1
  fi
  _cp_cmake="${_cp_cmake:+$_cp_cmake }-DCARPRUNE_CUDA=ON -DCUDA_TOOLKIT_ROOT_DIR=$CUDA_TOOLKIT_ROOT_DIR"
  _cp_say "building carprune with CPU and CUDA kernels ($TORCH_CUDA_ARCH_LIST) into $CARPRUNE_VENV" \
          "(2-3 min the first time on 2 cores, seconds when unchanged)"
else
  _cp_say "building carprune into $CARPRUNE_VENV (1-2 min the first time on 2 cores, seconds when unchanged)"
fi
CMAKE_ARGS="$_cp_cmake" "$CARPRUNE_VENV/bin/python" -m pip install -q --no-build-isolation \
  --config-settings=build-dir="$_cp_build" "$_cp_here" 2> >(grep -v "is ignored: it is neither" >&2)
_cp_say "environment ready: $CARPRUNE_VENV"
export CARPRUNE_TORCH CARPRUNE_VENV
export PATH="$CARPRUNE_VENV/bin:$PATH"
unset -v _cp_here _cp_cache _cp_cpu_index _cp_torch _cp_vision _cp_py _cp_has_torch _cp_has_vision \
  _cp_build _cp_cmake _cp_t0
unset -f _cp_say _cp_pip
set +euo pipefail
