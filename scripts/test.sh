#!/usr/bin/env bash
# Set up (or reuse) the environment, build carprune, and run the test suite (ruff, then pytest;
# arguments go to pytest). The tests marked `torchvision` need a torchvision that matches the torch
# carprune is built against. The CPU venv has one when PyTorch's CPU wheel index was reachable at
# set-up; otherwise (PyPI only, as on this project's machines) those tests are deselected here and
# run in the torch 2.14.1 + torchvision 0.29.1 venv (scripts/env.sh with CARPRUNE_TORCH=cuda: the
# CUDA builds, run on the CPU; the same venv and build directory as CI's CUDA build check).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
set -euo pipefail
bash scripts/ensure_chromium.sh   # the report test renders the HTML page in headless Chromium
ruff check python tests benchmarks scripts examples
if python -c "import torchvision" >/dev/null 2>&1; then
  exec python -m pytest tests -q "$@"
fi
echo "[carprune] torchvision cannot be imported in $CARPRUNE_VENV: tests marked torchvision run" \
     "in the torch 2.14.1 + torchvision 0.29.1 venv (CARPRUNE_TORCH=cuda), the others here"
rc=0
python -m pytest tests -q -m "not torchvision" "$@" || rc=$?
rc_tv=0
(
  CARPRUNE_TORCH=cuda
  CARPRUNE_VENV=""   # env.sh's default for cuda
  unset PYTHONPATH   # the installed carprune of that venv, built against its torch
  source scripts/env.sh
  set -euo pipefail
  python -m pytest tests -q -m torchvision "$@"
) || rc_tv=$?
# 5 is pytest's "no tests selected": fine for one of the two runs (e.g. with -k), not for both.
if [ "$rc" -eq 5 ] && [ "$rc_tv" -eq 5 ]; then exit 5; fi
for r in "$rc" "$rc_tv"; do
  if [ "$r" -ne 0 ] && [ "$r" -ne 5 ]; then exit "$r"; fi
done
