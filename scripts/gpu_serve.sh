#!/usr/bin/env bash
# Serving sweep on a GPU machine (device tool): for each backend, the real server on cuda, closed-loop load
# at 1 / 8 / 32 / 64 clients on /v1/rank (100 candidates) and /v1/recommend, GPU utilisation from NVML.
# Usage: scripts/gpu_serve.sh OUTDIR [extra python -m grinfer.bench.serve_sweep flags]
#   env: BACKENDS (eager,compiled,fused), CLIENTS (1,8,32,64), DURATION (10 s a level), ENDPOINTS
#   (rank,recommend), GRINFER_HOME (where the demo models are trained once: .grinfer-cache/ of the checkout)
# Wheels the image lacks come from .whl/ (scripts/gpu_wheels.sh fills it here; carry `.whl`).
# Writes OUTDIR/serve_sweep.{json,png,txt}, OUTDIR/card.txt and OUTDIR/servers.tar.gz (each server's log
# and its /metrics page before and after the load, packed: the device tool brings back only a few files).
set -uo pipefail
out=${1:?OUTDIR}; shift
source scripts/gpu_env.sh
export GRINFER_HOME=${GRINFER_HOME:-$PWD/.grinfer-cache}
python3 -c "import fastapi, grpc, pydantic, pynvml, uvicorn, grinfer.serving.server" \
  || { echo "gpu_serve: the server's packages do not import (run scripts/gpu_wheels.sh here and carry .whl)" >&2; exit 2; }
python3 -m grinfer.bench.serve_sweep --device cuda --out "$out" --backends "${BACKENDS:-eager,compiled,fused}" \
  --clients "${CLIENTS:-1,8,32,64}" --duration "${DURATION:-10}" --endpoints "${ENDPOINTS:-rank,recommend}" "$@" \
  | tee "$out/serve_sweep.txt"
rc=${PIPESTATUS[0]}
(cd "$out" && tar -czf servers.tar.gz server-*.log metrics-*.txt && rm -f server-*.log metrics-*.txt)
exit "$rc"
