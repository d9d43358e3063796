#!/usr/bin/env bash
# Quality runs on a GPU machine (device tool): hstu-ml1m retrieval and MTGR ranking + ablations on the
# MovieLens-1M subset. Usage: scripts/gpu_quality.sh OUTDIR [retrieval|ranking|ablations]...
set -uo pipefail
out=${1:?OUTDIR}; shift
data=${DATA:-shared/data/ml-1m-subset}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/card.txt"
g() { python3 -m grinfer.cli "$@"; }
for job in "$@"; do
  case $job in
    retrieval) g train --data "$data" --task retrieval --preset hstu-ml1m --epochs "${RET_EPOCHS:-100}" \
                 --out "$out/hstu" --device cuda 2>&1 | tr '\r' '\n' | grep -v "it/s\]" | tail -30 ;;
    ranking) g train --data "$data" --task ranking --preset "${RANK_PRESET:-mtgr-small}" --epochs "${RANK_EPOCHS:-6}" \
               --lr "${RANK_LR:-3e-4}" --out "$out/mtgr" --device cuda 2>&1 | tr '\r' '\n' | tail -12 ;;
    ablations)
      g train --data "$data" --task ranking --preset "${RANK_PRESET:-mtgr-small}" --epochs "${RANK_EPOCHS:-6}" \
        --lr "${RANK_LR:-3e-4}" --set group_ln=false --out "$out/mtgr-nogln" --device cuda 2>&1 | tr '\r' '\n' | tail -8
      g train --data "$data" --task ranking --preset "${RANK_PRESET:-mtgr-small}" --epochs "${RANK_EPOCHS:-6}" \
        --lr "${RANK_LR:-3e-4}" --set mask=causal --out "$out/mtgr-causal" --device cuda 2>&1 | tr '\r' '\n' | tail -8 ;;
  esac
done
