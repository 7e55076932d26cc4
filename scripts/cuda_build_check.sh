#!/usr/bin/env bash
# Prove the CUDA path compiles and links without a GPU: build carprune against torch 2.14.1 (a CUDA 13
# build) with nvcc, and require a CPU, CUDA and Meta kernel for every carprune op. The venv is
# scripts/env.sh's CARPRUNE_TORCH=cuda one ($CARPRUNE_CACHE/venv-cuda, 5.9 GB, with torchvision
# 0.29.1), and its build directory is kept there too: scripts/test.sh reuses both for the tests
# marked torchvision when the CPU venv has no torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."
CARPRUNE_TORCH=cuda
CARPRUNE_VENV=""   # env.sh's default for cuda, not a CPU venv the caller may have chosen
source scripts/env.sh
set -euo pipefail
cd /tmp
"$CARPRUNE_VENV/bin/python" - <<'PY'
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
