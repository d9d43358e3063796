#!/usr/bin/env bash
# Several GPUs in one host (issue 20), one device call on nvidia-h200-x2: R1-warm through the real server
# (mtgr-large, random weights; each user 1000 S + 90 R cached, 10 new events and 512 candidates a request,
# B = CLIENTS closed loops) with 1 GPU (--devices cuda:0), then 2 GPUs in one process (--devices
# cuda:0,cuda:1) followed by the failure drill (engine 1 fails a third into the run, heals at two thirds),
# then two one-GPU replicas behind HAProxy hashing X-User-Id (skipped without haproxy). One table at the end.
# Usage: scripts/gpu_multi.sh OUTDIR   (carry `.whl`, filled by scripts/gpu_wheels.sh)
#   STAGES (default "one two replicas"): which runs; the whole set can pass the device tool's 10 minutes,
#   so take it in two calls on one warm machine: STAGES="one two", then STAGES=replicas (the prepared
#   model and store under GRINFER_HOME are reused; the table covers every JSON found in OUTDIR)
#   env: BACKEND (fused), WORKERS (4 front-end processes; each replica gets half), CLIENTS (32),
#        DURATION (20 s per timed run), USERS (128), GRINFER_HOME
#   DEVICES_KIND=cpu: the same steps on cpu / cpu,cpu at tiny sizes (a smoke test of this script)
# Writes OUTDIR/{one,two,replicas}.json, OUTDIR/table.txt, OUTDIR/stages.txt, logs in OUTDIR/*.txt.
set -uo pipefail
out=${1:?OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export GRINFER_HOME=${GRINFER_HOME:-$PWD/.grinfer-cache}
home=$GRINFER_HOME/multi
workers=${WORKERS:-4}
if [ "${DEVICES_KIND:-cuda}" = cpu ]; then
  one=cpu; two=cpu,cpu; replica_devices=(cpu cpu); workers=${WORKERS:-0}
  size=(--preset mtgr-tiny --items 200 --users "${USERS:-16}" --static 60 --realtime 10)
  load=(--clients "${CLIENTS:-4}" --load-procs 1 --duration "${DURATION:-6}" --candidates 50)
  backend=${BACKEND:-eager}
  export GRINFER_KV_CACHE_MB=${GRINFER_KV_CACHE_MB:-64}
else
  source scripts/gpu_env.sh
  one=cuda:0; two=cuda:0,cuda:1; replica_devices=(cuda:0 cuda:1)
  size=(--preset mtgr-large --items 20000 --users "${USERS:-128}" --static 1000 --realtime 90)
  load=(--clients "${CLIENTS:-32}" --load-procs 4 --duration "${DURATION:-20}" --candidates 512)
  backend=${BACKEND:-fused}
  # every user's 1106-token context stays on the device (46 KiB a token); one step takes a whole batch
  export GRINFER_KV_CACHE_MB=${GRINFER_KV_CACHE_MB:-16000} GRINFER_MAX_BATCH_TOKENS=${GRINFER_MAX_BATCH_TOKENS:-32768}
fi
export GRINFER_LATENCY_TARGET_MS=0 PYTHONUNBUFFERED=1  # closed loops: measure capacity, not the shedding
stage() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "$name: rc=$? in $((SECONDS - t0)) s" | tee -a "$out/stages.txt"
  grep -v " INFO \| WARNING grinfer.engine" "$out/$name.txt" | tail -12
}
serve=(python3 scripts/gpu_multi.py serve --home "$home" --backend "$backend" --workers "$workers" "${load[@]}")
stages=" ${STAGES:-one two replicas} "
[ -f "$home/model/config.json" ] || stage prepare 150 python3 scripts/gpu_multi.py prepare --home "$home" "${size[@]}"
[[ $stages == *" one "* ]] && stage one-device 200 "${serve[@]}" --devices "$one" --out "$out/one.json"
[[ $stages == *" two "* ]] && stage two-devices 240 "${serve[@]}" --devices "$two" --drill --out "$out/two.json"

replicas() {  # two one-device servers on the same store behind HAProxy, then the same load through it
  command -v haproxy > /dev/null || { echo "no haproxy: replicas not measured"; return 0; }
  local pids=() addrs=() i port
  for i in 0 1; do
    port=$(python3 -c "from grinfer.serving.background import free_port; print(free_port())")
    GRINFER_HOME=$home/replica-$i python3 -m grinfer.cli serve --model "$home/model" --store "sqlite:///$home/multi.db" \
      --device "${replica_devices[$i]}" --backend "$backend" --workers $((workers / 2)) --host 127.0.0.1 \
      --port "$port" --grpc-port 0 > "$out/replica-$i.txt" 2>&1 &
    pids+=($!); addrs+=("127.0.0.1:$port")
    python3 - "$port" <<'EOF' || { kill "${pids[@]}"; return 1; }
import sys, time, httpx
for _ in range(360):  # at most 3 min each, one at a time: the two starts do not race for the store
    try:
        if httpx.get(f"http://127.0.0.1:{sys.argv[1]}/readyz", timeout=2, trust_env=False).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(0.5)
sys.exit("replica not ready")
EOF
  done
  local lb
  lb=$(python3 -c "from grinfer.serving.background import free_port; print(free_port())")
  python3 -m grinfer.cli deploy haproxy --replicas "$(IFS=,; echo "${addrs[*]}")" --listen "127.0.0.1:$lb" \
    --out "$out/haproxy.cfg"
  haproxy -db -f "$out/haproxy.cfg" > "$out/haproxy.txt" 2>&1 &
  pids+=($!)
  sleep 1
  python3 scripts/gpu_multi.py load --home "$home" --url "http://127.0.0.1:$lb" --label "2 replicas + haproxy" \
    --out "$out/replicas.json" "${load[@]}"
  local rc=$?
  kill -TERM "${pids[@]}"
  wait "${pids[@]}" 2> /dev/null
  return $rc
}
if [[ $stages == *" replicas "* ]]; then
  t0=$SECONDS  # a shell function: each of its steps is bounded (readiness 180 s a replica, the load its duration)
  replicas > "$out/replicas.txt" 2>&1
  echo "replicas: rc=$? in $((SECONDS - t0)) s" | tee -a "$out/stages.txt"
  tail -8 "$out/replicas.txt"
fi
python3 scripts/gpu_multi.py report "$out/one.json" "$out/two.json" "$out/replicas.json" | tee "$out/table.txt"
exit 0
