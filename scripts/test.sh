#!/usr/bin/env bash
# The README's test command: set up .venv with the test extras (once), lint, then run the test suite on
# the CPU. Extra arguments go to pytest, e.g. `scripts/test.sh tests/docs -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check grinfer tests
.venv/bin/pyright  # basic mode over grinfer ([tool.pyright] in pyproject.toml); node comes from a wheel
.venv/bin/python -m pytest "$@"
