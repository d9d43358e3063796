#!/usr/bin/env bash
# Engine v2 on one GPU (device tool), in one call: (1) R1-cold / R1-warm, eager and fused, B = 8 and 32,
# pipeline depth 1 and 2 (grinfer bench; each row's error against the uncached model is its correctness
# check), (2) the real server, fused then auto, under closed-loop load (serve_sweep).
# Each stage has its own time limit so the whole call stays inside the device tool's 10 minutes.
# Usage: scripts/gpu_engine_v2.sh OUTDIR   (carry `.whl`, filled by scripts/gpu_wheels.sh)
set -uo pipefail
out=${1:?OUTDIR}
source scripts/gpu_env.sh
export GRINFER_HOME=${GRINFER_HOME:-$PWD/.grinfer-cache}
for w in R1-cold R1-warm; do
  stage "bench-$w" 95 python3 -m grinfer.cli bench --workloads "$w" --backends eager,fused --batch 8 --batch 32 \
    --pipeline-depth 1 --pipeline-depth 2 --iters "${ITERS:-6}" --device cuda --json "$out/bench-$w.json"
done
for b in fused auto; do
  stage "serve-$b" "$([ "$b" = auto ] && echo 190 || echo 170)" python3 -m grinfer.bench.serve_sweep --device cuda \
    --out "$out/sweep-$b" --backends "$b" --clients 1,8,64 --duration "${DURATION:-6}" --endpoints rank,recommend
done
# the device tool brings back only a few files: everything but the stage list goes into one archive
(cd "$out" && tar -czf results.tar.gz --exclude=results.tar.gz --exclude=stages.txt --exclude=card.txt . \
  && find . -mindepth 1 ! -name results.tar.gz ! -name stages.txt ! -name card.txt -delete)
exit 0
