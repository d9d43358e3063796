#!/usr/bin/env bash
# Create or update .venv: the CPU build of torch (never PyPI's multi-GB CUDA default by accident), then
# grinfer in editable mode. `scripts/setup.sh` installs what serving needs; `scripts/setup.sh --test`
# adds the test extras (pytest, ruff, Playwright, Triton, grpcio-tools) to the same venv.
# Each set-up runs once: a stamp in .venv keyed on pyproject.toml, this script and TORCH_SPEC makes a
# repeated call return at once, so a warm `scripts/serve.sh` goes straight to `grinfer serve`.
#
# TORCH_SPEC overrides the torch install: pip arguments, word-split, e.g. for a CUDA build
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" scripts/setup.sh
# TORCH_WHEELS names a folder of local wheels to take the CPU torch from (default /opt/wheels).
set -euo pipefail
cd "$(dirname "$0")/.."

case ${1:-} in
  "") kind=serve extras="" ;;
  --test) kind=test extras="[test]" ;;
  *) echo "usage: scripts/setup.sh [--test]" >&2; exit 2 ;;
esac

TORCH_VERSION=2.13.0
CPU_INDEX=https://download.pytorch.org/whl/cpu
key=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)-${TORCH_SPEC:-cpu}
stamp=.venv/.grinfer-setup-$kind
[ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] && exit 0

pip=(.venv/bin/python -m pip install -q)
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
  "${pip[@]}" --upgrade pip
fi

# The CPU wheel by its local version label (+cpu), from a local wheel folder when it holds one, else
# PyTorch's CPU index beside the default index (macOS: PyPI's wheel is the CPU build and has no label).
torch_cpu() {
  local wheels=${TORCH_WHEELS:-/opt/wheels}
  if [ "$(uname -s)" = Darwin ]; then
    echo "torch==$TORCH_VERSION"
  elif compgen -G "$wheels/torch-$TORCH_VERSION+cpu-*.whl" >/dev/null; then
    echo "--find-links $wheels torch==$TORCH_VERSION+cpu"
  else
    echo "--extra-index-url $CPU_INDEX torch==$TORCH_VERSION+cpu"
  fi
}
if [ -n "${TORCH_SPEC:-}" ]; then
  # shellcheck disable=SC2086  # TORCH_SPEC is pip arguments
  "${pip[@]}" $TORCH_SPEC
elif ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2046
  "${pip[@]}" $(torch_cpu)
fi

# setuptools prints a boxed note on every editable build; it is about src layouts and says nothing here.
PYTHONWARNINGS="ignore:Editable installation" "${pip[@]}" -e ".$extras"
echo "$key" > "$stamp"
[ "$kind" = test ] && echo "$key" > .venv/.grinfer-setup-serve
exit 0
