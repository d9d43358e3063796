#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels the server needs that the GPU machines' image lacks, for
# Python 3.12 on manylinux x86_64, at the versions this checkout's .venv runs (the tested ones). The
# GPU scripts (gpu_serve.sh, gpu_bench.sh, ...) install them with `pip install --no-deps --target`;
# carry `.whl` to the device machine with the working tree. Run here, where a registry can be reached.
# Then it checks that every package pyproject.toml's dependencies resolve to (for cp312) is either
# carried or in the image, and that the folder is well under what the device tool carries (64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python

# Not in the image (per the device notes' package list, read 2026-11-17), or in it at a version that
# may be below what grinfer needs: grpcio >= 1.85.1 and protobuf >= 7.35.1 (the committed stubs);
# typing-extensions, annotated-doc, typer and click carry the versions pydantic-core / fastapi /
# grinfer's CLI were tested with (small).
carry=(fastapi fastapi-offline starlette uvicorn httptools pydantic pydantic-core annotated-types typing-inspection
       opentelemetry-api grpcio grpcio-health-checking grpcio-reflection protobuf psycopg psycopg-binary psycopg-pool redis
       typing-extensions annotated-doc typer click)
# What the image already has among the packages the dependencies resolve to (its list, abridged).
image_has="anyio certifi click h11 httpcore httpx idna markdown-it-py matplotlib mdurl numpy prometheus-client
pygments rich safetensors shellingham torch tqdm typer typing-extensions annotated-doc sniffio grpcio protobuf uvloop"

platform=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
pins=()
for name in "${carry[@]}"; do
  version=$($py -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name" 2>/dev/null) \
    || { echo "gpu_wheels: $name is not installed in $py (run scripts/setup.sh)" >&2; exit 1; }
  pins+=("$name==$version")
done
# Optional on the GPU runs: torchao (the `quant` extra: dense int8 / fp8 on CUDA) and py-spy (serve_sweep
# --profile-clients); at this venv's versions when installed here, else the newest.
for name in torchao py-spy; do
  version=$($py -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name" 2>/dev/null) \
    && pins+=("$name==$version") || pins+=("$name")
done
rm -rf .whl && mkdir .whl
$py -m pip download -q --no-deps "${platform[@]}" --platform manylinux_2_28_x86_64 -d .whl "${pins[@]}"

bytes=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "$(ls .whl/*.whl | wc -l) wheels, $((bytes / 1024 / 1024)) MiB in .whl/"
if [ "$bytes" -gt $((40 * 1024 * 1024)) ]; then
  echo "gpu_wheels: .whl/ is over 40 MiB; with the working tree it may not fit the 64 MiB the device tool carries" >&2
  exit 1
fi

# The dependency closure for cp312 (torch, numpy and matplotlib left out: the image's own builds).
mapfile -t deps < <($py -c '
import re, tomllib
for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    if re.match(r"(torch|numpy|matplotlib)\b", d) is None:
        print(d)')
report=$(mktemp)
trap 'rm -f "$report"' EXIT
$py -m pip install -q --dry-run --ignore-installed "${platform[@]}" --target /tmp/gpu-wheels-dry-run \
  --report "$report" "${deps[@]}" 2>/dev/null
$py - "$report" "$image_has" .whl <<'EOF'
import json, re, sys
from pathlib import Path

norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
report, image, folder = json.load(open(sys.argv[1])), set(sys.argv[2].split()), Path(sys.argv[3])
carried = {norm(p.name.split("-")[0]) for p in folder.glob("*.whl")}
needed = {norm(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}
missing = sorted(n for n in needed if n not in carried and n not in image)
print(f"closure for cp312: {len(needed)} packages; carried {len(carried & needed.keys())}, "
      f"from the image {len(needed.keys() - carried)}")
if missing:
    sys.exit(f"gpu_wheels: neither carried nor in the image: {', '.join(missing)}")
EOF
# pip itself judges that every carried wheel installs on CPython 3.12, offline, as the GPU scripts install them
$py -m pip install -q --dry-run --no-index --no-deps "${platform[@]}" --target /tmp/gpu-wheels-dry-run \
  .whl/*.whl 2>/dev/null
echo "all $(ls .whl/*.whl | wc -l) wheels install on CPython 3.12 manylinux x86_64 (pip dry run)"
