#!/usr/bin/env bash
# The GPU performance issue's runs on one GPU (device tool), by stage, each with its own time limit so a
# call of several stages stays inside the device tool's 10 minutes:
#   serve   the real server (fused, --workers 6) under closed-loop load at 1/8/32/64 clients, rank and
#           recommend, GPU utilisation (NVML), host CPU, py-spy stacks at 64 clients (serve_sweep)
#   r1      grinfer bench R1-cold / R1-warm, fused, B = 8 and 32, pipeline depth 1 and 2
#   r1all   the same over eager, compiled, fused and auto (aoti packages the CPU step only)
#   stream  R1 on fused with every timed batch queued at once (--stream): depth 1 against 2, sustained
#   kernels the attention kernel's versions and launch shapes at the R1 shapes (grinfer.bench.kernels --sweep)
#   lowp    R1 on fused at B = 32: dense none / int8 / fp8, then KV cache model / int8 / fp8
#   8b      mtgr-8b: init-model (int8 tables, memory-mapped), then the server's time to ready and rank
#           latency at 1 and 8 clients, peak memory
# Usage: scripts/gpu_perf.sh OUTDIR STAGE...   (carry `.whl` from scripts/gpu_wheels.sh, and a
# GRINFER_HOME holding the demo models, e.g. .grinfer-cache). Everything comes back as one archive.
set -uo pipefail
out=${1:?OUTDIR}; shift
source scripts/gpu_env.sh
export GRINFER_HOME=${GRINFER_HOME:-$PWD/.grinfer-cache} GRINFER_LOG_LEVEL=${GRINFER_LOG_LEVEL:-warning}
export PATH=/tmp/site/bin:$PATH  # py-spy's binary, from the carried wheel
STAGE_TAIL=24
bench=(python3 -m grinfer.cli bench --device cuda --iters "${ITERS:-6}")  # timeout runs programs, not functions
for s in "$@"; do
  case $s in
    serve) GRINFER_WORKERS=${WORKERS:-6} GRINFER_LOG_LEVEL=info stage serve 330 python3 -m grinfer.bench.serve_sweep --device cuda \
             --out "$out/serve" --backends fused --clients "${CLIENTS:-1,8,32,64}" --duration "${DURATION:-6}" \
             --endpoints rank,recommend --load-processes 8 --profile-clients 64 ;;
    r1) stage r1 200 "${bench[@]}" --workloads R1-cold,R1-warm --backends fused --batch 8 --batch 32 \
          --pipeline-depth 1 --pipeline-depth 2 --json "$out/r1.json" ;;
    r1all) stage r1all 540 "${bench[@]}" --workloads R1-cold,R1-warm --backends eager,compiled,fused,auto \
             --batch 8 --batch 32 --pipeline-depth 1 --pipeline-depth 2 --json "$out/r1all.json" ;;
    stream) stage stream 200 "${bench[@]}" --workloads R1-cold,R1-warm --backends fused --batch 8 --batch 32 \
              --pipeline-depth 1 --pipeline-depth 2 --stream --iters "${ITERS:-8}" --json "$out/stream.json" ;;
    kernels) stage kernels 360 python3 -m grinfer.bench.kernels --sweep --json "$out/kernels.json" ;;
    lowp-kv) stage lowp-kv 150 "${bench[@]}" --workloads R1-cold,R1-warm --backends fused --batch 32 \
               --kv-dtype model --kv-dtype int8 --kv-dtype fp8 --json "$out/lowp-kv.json" ;;
    lowp) stage lowp-dense 270 "${bench[@]}" --workloads R1-cold,R1-warm --backends fused --batch 32 \
            --dense none --dense int8 --dense fp8 --json "$out/lowp-dense.json"
          stage lowp-kv 150 "${bench[@]}" --workloads R1-cold,R1-warm --backends fused --batch 32 \
            --kv-dtype model --kv-dtype int8 --kv-dtype fp8 --json "$out/lowp-kv.json" ;;
    8b) stage 8b-init 300 python3 -m grinfer.cli init-model --preset mtgr-8b --out /tmp/mtgr-8b --set num_items=20000 \
          --data synthetic:users=200,items=20000,events=30,seed=0
        stage 8b-serve 300 python3 -m grinfer.bench.serve_sweep --device cuda --model /tmp/mtgr-8b \
          --out "$out/8b" --backends fused --clients 1,8 --duration 6 --endpoints rank ;;
    *) echo "gpu_perf: unknown stage $s (serve, r1, r1all, stream, kernels, lowp, lowp-kv, 8b)" >&2; exit 2 ;;
  esac
done
# the device tool brings back only a few files: everything but the stage list goes into one archive
(cd "$out" && tar -czf results.tar.gz --exclude=results.tar.gz --exclude=stages.txt --exclude=card.txt . \
  && find . -mindepth 1 ! -name results.tar.gz ! -name stages.txt ! -name card.txt -delete)
exit 0
