#!/usr/bin/env bash
# The README's test command: set up .venv if needed, lint, then run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check grinfer tests
.venv/bin/python -m pytest "$@"
