#!/usr/bin/env bash
# Check and time the Triton kernels on a GPU at the R1 shapes (mtgr-large attention; see KERNELS.md).
# Usage: scripts/gpu_kernels.sh [OUTDIR] [python3 -m grinfer.bench.kernels flags, e.g. --sweep]
# --sweep also times the launch shapes and the kernel variants (versions 5+) at R1 cold and warm: ~3-4 min.
# Needs torch + triton only (the GPU machines have both); OUTDIR defaults to $OUT or runs/gpu-kernels.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-runs/gpu-kernels}}
[ $# -gt 0 ] && shift
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader \
  | tee "$out/card.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/card.txt"
# progress (one line per timed variant, a row per variant that fails to compile) goes to check.log as it runs;
# KERNELS_LIMIT_S (default 540) stops a run that would outlast the device call, its rows printed so far kept
timeout "${KERNELS_LIMIT_S:-540}" python3 -m grinfer.bench.kernels --json "$out/check.json" "$@" 2>&1 \
  | tee "$out/check.log"
exit "${PIPESTATUS[0]}"
