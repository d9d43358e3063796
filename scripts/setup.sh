#!/usr/bin/env bash
# Create .venv with the CPU build of torch (so pip never pulls a multi-GB CUDA build) and grinfer.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # Override TORCH_SPEC (e.g. with a CPU wheel index) on machines without the local CPU wheel.
  links=(); [ -d /opt/wheels ] && links=(--find-links /opt/wheels)
  .venv/bin/python -m pip install -q "${links[@]}" ${TORCH_SPEC:-"torch==2.13.0"}
fi
.venv/bin/python -m pip install -q -e ".[test]"
