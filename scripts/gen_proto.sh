#!/usr/bin/env bash
# Regenerate the committed gRPC stubs (grinfer/serving/proto/*_pb2*.py*) from grinfer.proto and inference.proto;
# `scripts/gen_proto.sh --check` only verifies they are current. Needs grpcio-tools (the test extra).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PY" -m grinfer.serving.proto.generate "$@"
