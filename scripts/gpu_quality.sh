#!/usr/bin/env bash
# Quality runs on a GPU machine (device tool): hstu-ml1m retrieval and MTGR ranking + ablations on the
# MovieLens-1M subset. Usage: scripts/gpu_quality.sh OUTDIR [retrieval|ranking|ablations]...
# Each job's full log goes to OUTDIR/<job>.log; metrics.json files are copied to OUTDIR/<job>.json.
set -uo pipefail
out=${1:?OUTDIR}; shift
data=${DATA:-shared/data/ml-1m-subset}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/card.txt"
rank_args=(--task ranking --preset "${RANK_PRESET:-mtgr-small}" --epochs "${RANK_EPOCHS:-3}" --lr "${RANK_LR:-3e-4}")
train() {  # name, args...
  local name=$1; shift
  python3 -m grinfer.cli train --data "$data" --device cuda --out "/tmp/ckpt/$name" "$@" 2>&1 | tr '\r' '\n' \
    | grep --line-buffered -v "^$" > "$out/$name.log"
  cp "/tmp/ckpt/$name/metrics.json" "$out/$name.json" 2>/dev/null
  tail -8 "$out/$name.log"
}
for job in "$@"; do
  case $job in
    retrieval) train hstu --task retrieval --preset hstu-ml1m --epochs "${RET_EPOCHS:-100}" ;;
    ranking) train mtgr "${rank_args[@]}" ;;
    ablations) train mtgr-nogln "${rank_args[@]}" --set group_ln=false
               train mtgr-causal "${rank_args[@]}" --set mask=causal ;;
  esac
done
