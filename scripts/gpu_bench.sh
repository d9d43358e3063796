#!/usr/bin/env bash
# Engine benchmarks on a GPU machine (device tool): R1-cold / R1-warm at B = 8 and 32, eager and compiled.
# Usage: scripts/gpu_bench.sh OUTDIR [extra grinfer bench flags]
set -uo pipefail
out=${1:?OUTDIR}; shift
source scripts/gpu_env.sh
python3 -m grinfer.cli bench --workloads "${WORKLOADS:-R1-cold,R1-warm}" --backends "${BACKENDS:-eager,compiled}" \
  --batch 8 --batch 32 --iters "${ITERS:-10}" --device cuda --json "$out/bench.json" "$@" 2>&1 | tr '\r' '\n' \
  | grep -v "it/s\]\|s/it\]" | tee "$out/bench.txt"
