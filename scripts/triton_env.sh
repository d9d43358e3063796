#!/usr/bin/env bash
# Build a Python environment for NVIDIA Triton Inference Server serving `grinfer export triton-repo`'s
# repository, on the CPU or a GPU: nvidia-pytriton's wheel (a `tritonserver` binary with the Python backend),
# tritonclient (HTTP and gRPC), numpy < 2 (the Python backend stub needs it), the CPU torch and grinfer from
# this checkout. It is kept apart from .venv: tritonclient needs protobuf < 7, grinfer's gRPC stubs >= 7.35.
#
#   scripts/triton_env.sh DIR     # once (about a minute); again: returns at once
#   DIR/bin/tritonserver --model-repository REPO ...     # the server, its Python backend ready
#   DIR/bin/python client.py                             # tritonclient
#
# PYTHON picks the interpreter (default python3); TORCH_WHEELS a folder of local torch wheels (default
# /opt/wheels), else PyTorch's CPU index is used; TORCH_SPEC (pip arguments) installs another build, e.g.
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" scripts/triton_env.sh DIR
# for `grinfer export triton-repo --device cuda:N`. A stamp keyed on this script makes a repeated call a no-op.
set -euo pipefail
dir=$(realpath -m "${1:?usage: scripts/triton_env.sh DIR}")
cd "$(dirname "$0")/.."
key=$(sha256sum scripts/triton_env.sh | cut -c1-16)
[ -f "$dir/complete" ] && [ "$(cat "$dir/complete")" = "$key" ] && exit 0

TORCH_VERSION=2.13.0
wheel=$(compgen -G "${TORCH_WHEELS:-/opt/wheels}/torch-$TORCH_VERSION+cpu-*.whl" | tail -1 || true)
if [ -n "${TORCH_SPEC:-}" ]; then read -ra torch <<< "$TORCH_SPEC"  # pip arguments, e.g. a CUDA build
elif [ -n "$wheel" ]; then torch=("$wheel")
else torch=("torch==$TORCH_VERSION" --extra-index-url https://download.pytorch.org/whl/cpu); fi

rm -rf "$dir"
"${PYTHON:-python3}" -m venv "$dir"
py="$dir/bin/python"
"$py" -m pip install -q --disable-pip-version-check "${torch[@]}" "nvidia-pytriton==0.7.0" \
  "tritonclient[http,grpc]==2.73.0" "numpy>=1.26,<2" "safetensors>=0.4,<1" "pydantic>=2.6,<3"
# grinfer itself: the models' code (its serving dependencies are not needed inside Triton)
PYTHONWARNINGS="ignore:Editable installation" "$py" -m pip install -q --disable-pip-version-check --no-deps -e .

# The server tree with this Python's backend stub in backends/python (as pytriton prepares it before a start)
read -r version site libdir < <("$py" -c 'import sys, sysconfig; print(f"{sys.version_info[0]}.{sys.version_info[1]}",
  sysconfig.get_paths()["purelib"], sysconfig.get_config_var("LIBDIR"))')
dist="$site/pytriton/tritonserver"
stub="$dist/python_backend_stubs/$version/triton_python_backend_stub"
[ -f "$stub" ] || { echo "nvidia-pytriton has no Python backend stub for Python $version" >&2; exit 1; }
mkdir -p "$dir/tritonserver"
cp -r "$dist/bin" "$dist/backends" "$dist/caches" "$dir/tritonserver/"
cp "$stub" "$dir/tritonserver/backends/python/"
missing=$(LD_LIBRARY_PATH="$site/nvidia_pytriton.libs:$libdir" ldd "$dir/tritonserver/backends/python/$(basename "$stub")" \
  | grep "not found" || true)
if [ -n "$missing" ]; then
  echo "the Python backend stub cannot load its libraries: $(echo $missing | tr -s ' ') (it needs libpython$version.so:" \
       "a Python built with --enable-shared, e.g. Debian's libpython$version package)" >&2
  exit 1
fi

# bin/tritonserver: the wheel's libraries and this interpreter's libpython found, its backends given
cat > "$dir/bin/tritonserver" <<EOF
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$site/nvidia_pytriton.libs:$libdir\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export PATH="$dir/bin:\$PATH"
exec "$dir/tritonserver/bin/tritonserver" --backend-directory "$dir/tritonserver/backends" \\
  --cache-directory "$dir/tritonserver/caches" "\$@"
EOF
chmod +x "$dir/bin/tritonserver"
echo "$key" > "$dir/complete"
