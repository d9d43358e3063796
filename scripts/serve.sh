#!/usr/bin/env bash
# The README's main-job command: set up .venv for serving (once; later starts skip straight on), then
# start the server on the embedded default (SQLite + in-process cache, demo models trained on synthetic
# data on first start). Extra flags go to `grinfer serve` (see `grinfer serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/grinfer serve "$@"
