#!/usr/bin/env bash
# Set up (or reuse) the environment, build carprune, and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
set -euo pipefail
ruff check python tests benchmarks scripts
python -m pytest tests -q "$@"
