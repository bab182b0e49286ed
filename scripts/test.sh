#!/usr/bin/env bash
# Set up (if needed) and run lint + the whole test suite, slow end-to-end tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"  # the Flower deployment test starts flower-superlink etc.
.venv/bin/ruff check src tests
.venv/bin/python -m pytest -q "$@"
