#!/usr/bin/env bash
# Prove the CUDA path compiles and links without a GPU: build carprune once against torch 2.14.1
# (a CUDA 13 build) with nvcc, and require a CPU, CUDA and Meta kernel for every carprune op.
# The venv (5.6 GB) and build directory are cached in $CARPRUNE_CI_CACHE (~/.cache/carprune).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${CARPRUNE_CI_CACHE:-$HOME/.cache/carprune}"
mkdir -p "$CACHE"
CUDA_VENV="$CACHE/venv-cuda"
if [ ! -x "$CUDA_VENV/bin/python" ]; then
  "$(command -v python3.11 || command -v python3)" -m venv "$CUDA_VENV"
fi
_quiet() { grep -v "is ignored: it is neither" >&2 || true; }
"$CUDA_VENV/bin/python" -m pip install -q "torch==2.14.1" numpy "scikit-build-core>=0.10" \
  pybind11 "cmake>=3.26" ninja 2> >(_quiet)
export CUDA_TOOLKIT_ROOT_DIR="${CUDA_TOOLKIT_ROOT_DIR:-/usr/local/cuda}"
export CUDACXX="${CUDACXX:-$CUDA_TOOLKIT_ROOT_DIR/bin/nvcc}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
CMAKE_ARGS="-DCARPRUNE_CUDA=ON -DCUDA_TOOLKIT_ROOT_DIR=$CUDA_TOOLKIT_ROOT_DIR" \
  "$CUDA_VENV/bin/python" -m pip install -q --no-build-isolation \
  --config-settings=build-dir="$CACHE/build-cuda-$(pwd | cksum | cut -d" " -f1)" . 2> >(_quiet)
cd /tmp
"$CUDA_VENV/bin/python" - <<'PY'
import torch

import carprune

ops = sorted({s.name.split("::")[1] for s in torch._C._jit_get_all_schemas()
              if s.name.startswith("carprune::")})
assert carprune._ops.WITH_CUDA, "the CUDA build produced a module without CUDA kernels"
assert ops, "no carprune ops registered"
for op in ops:
    dump = torch._C._dispatch_dump(f"carprune::{op}")
    for key in ("CPU:", "CUDA:", "Meta:"):
        assert any(line.startswith(key) for line in dump.splitlines()), f"{op}: no {key} kernel"
print(f"torch {torch.__version__}: CPU, CUDA and Meta kernels registered for {', '.join(ops)}")
PY
