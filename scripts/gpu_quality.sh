#!/usr/bin/env bash
# Quality runs on a GPU machine (device tool) on the MovieLens-1M subset. Usage:
#   scripts/gpu_quality.sh OUTDIR [default|default-retrieval|default-ranking|recipe-variants|retrieval|ranking|
#   ablations]...
# default = default-retrieval + default-ranking: the flagless recipe (`grinfer train --task retrieval --preset
#   hstu-ml1m`, `grinfer train --task ranking`, no optimisation flags) on the subset and on a second
#   MovieLens-format dataset built from it (users 2000-2999 only, scripts/slice_movielens.py), plus the
#   GroupLN ablation (--set group_ln=false) under the same recipe.
# recipe-variants = the alternatives the recipe was chosen against (cosine decay for retrieval, a constant
#   learning rate for ranking, GroupLN with a 10x learning rate, 150 fixed epochs on the second dataset).
# retrieval / ranking / ablations = the earlier hand-tuned runs (fixed epochs and learning rate).
# Each job's full log goes to OUTDIR/<job>.log, its metrics.json to OUTDIR/<job>.json; the time of each
# job is printed and summed in OUTDIR/times.txt.
set -uo pipefail
out=${1:?OUTDIR}; shift
data=${DATA:-shared/data/ml-1m-subset}
slice=${SLICE:-/tmp/ml-1m-users-2000-2999}
source scripts/gpu_env.sh
rank_args=(--task ranking --preset "${RANK_PRESET:-mtgr-small}" --epochs "${RANK_EPOCHS:-3}" --lr "${RANK_LR:-3e-4}")
train() {  # name, dataset, args...
  local name=$1 dir=$2 start=$SECONDS; shift 2
  python3 -m grinfer.cli train --data "$dir" --device cuda --out "/tmp/ckpt/$name" "$@" 2>&1 | tr '\r' '\n' \
    | grep --line-buffered -v "^$" > "$out/$name.log"
  cp "/tmp/ckpt/$name/metrics.json" "$out/$name.json" 2>/dev/null
  grep -v "it/s\]\|s/it\]\|epoch/s\]\|s/epoch\]" "$out/$name.log" | tail -12
  echo "== $name: $((SECONDS - start)) s" | tee -a "$out/times.txt"
}
second_dataset() {
  [ -f "$slice/ratings.dat" ] || python3 scripts/slice_movielens.py "$data" "$slice" --users 2000-2999
}
jobs=()
for job in "$@"; do
  if [ "$job" = default ]; then jobs+=(default-retrieval default-ranking); else jobs+=("$job"); fi
done
for job in "${jobs[@]}"; do
  case $job in
    default-retrieval) second_dataset
                       train hstu-default "$data" --task retrieval --preset hstu-ml1m
                       train hstu-default-u2000 "$slice" --task retrieval --preset hstu-ml1m ;;
    default-ranking) second_dataset
                     train mtgr-default "$data" --task ranking
                     train mtgr-nogln-default "$data" --task ranking --set group_ln=false
                     train mtgr-default-u2000 "$slice" --task ranking ;;
    recipe-variants) second_dataset  # what the recipe's choices were measured against
                     train hstu-cosine "$data" --task retrieval --preset hstu-ml1m --decay cosine --warmup-steps 200
                     train hstu-150-u2000 "$slice" --task retrieval --preset hstu-ml1m --epochs 150 --no-validate
                     train mtgr-constant-lr "$data" --task ranking --decay none --warmup-steps 0
                     train mtgr-gln-lr10 "$data" --task ranking --group-lr-scale 10 ;;
    retrieval) train hstu "$data" --task retrieval --preset hstu-ml1m --epochs "${RET_EPOCHS:-100}" ;;
    ranking) train mtgr "$data" "${rank_args[@]}" ;;
    ablations) train mtgr-nogln "$data" "${rank_args[@]}" --set group_ln=false
               train mtgr-causal "$data" "${rank_args[@]}" --set mask=causal ;;
    *) echo "gpu_quality: unknown job $job" >&2; exit 2 ;;
  esac
done
awk '{s += $(NF-1)} END {print "total: " s " s"}' "$out/times.txt" 2>/dev/null
