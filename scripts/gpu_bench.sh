#!/usr/bin/env bash
# Engine benchmarks on a GPU machine (device tool): R1-cold / R1-warm at B = 8 and 32, eager and compiled.
# Usage: scripts/gpu_bench.sh OUTDIR [extra grinfer bench flags]
set -uo pipefail
out=${1:?OUTDIR}; shift
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/card.txt"
python3 -m grinfer.cli bench --workloads "${WORKLOADS:-R1-cold,R1-warm}" --backends "${BACKENDS:-eager,compiled}" \
  --batch 8 --batch 32 --iters "${ITERS:-10}" --device cuda --json "$out/bench.json" "$@" 2>&1 | tr '\r' '\n' \
  | grep -v "it/s\]\|s/it\]" | tee "$out/bench.txt"
