# Sourced by the GPU scripts (gpu_bench.sh, gpu_serve.sh, gpu_quality.sh, gpu_engine_v2.sh) with $out set:
# the wheels the image lacks, carried in .whl/ (scripts/gpu_wheels.sh fills it), on the path; unbuffered
# output; the card's name, memory and driver in $out/card.txt.
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/card.txt"
# stage NAME SECONDS COMMAND...: run one stage under its own time limit, its output in $out/NAME.txt, its
# exit code and duration appended to $out/stages.txt, the last $STAGE_TAIL lines shown without progress bars
stage() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "$name: rc=$? in $((SECONDS - t0)) s" | tee -a "$out/stages.txt"
  tr '\r' '\n' < "$out/$name.txt" | grep -v "it/s\]\|s/it\]\|?it/s\|event/s\]" | tail -"${STAGE_TAIL:-40}"
}
