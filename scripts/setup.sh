#!/usr/bin/env bash
# Create .venv and install fedkin with its test tools. Torch is installed first, pinned to the
# CPU build (2.13.0), so the project's torch range never pulls a multi-GB CUDA wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test,ray,flower,diffusion]"
# ByzFL, the robust-aggregation test oracle: its aggregators need only numpy/scipy/torch.
.venv/bin/python -m pip install --quiet --no-deps "byzfl==0.0.11"
.venv/bin/python -m pip install --quiet --no-deps "torchao==0.18.0"
