#!/usr/bin/env bash
# Set up (or reuse) the environment, build carprune, and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
set -euo pipefail
bash scripts/ensure_chromium.sh   # the report test renders the HTML page in headless Chromium
ruff check python tests benchmarks scripts examples
python -m pytest tests -q "$@"
