#!/usr/bin/env bash
# Builds, on a CPU machine, a Python 3.12 venv with what a GPU host has (tests/gpu_host_packages.txt, a copy of
# ../shared/gpu-host/host-packages.txt: jax, flax, optax, orbax, transformers, ... with their dependencies), then
# the carried wheels (requirements-gpu-host.txt) and this project, both with --no-deps, as on a host with no
# network (docs/gpu_host.md). The same steps as ../shared/gpu-host/simulate.sh, kept here because CI has no
# ../shared. Needs PyPI (pip's cache makes a rebuild faster).
#   scripts/simulate_gpu_host.sh VENV [CARRY_FILE]      (CARRY_FILE: default requirements-gpu-host.txt; "" for none)
# Then: VENV/bin/python -m dd_jax.decompose ...   (the CPU backend; the same imports as on the host)
set -euo pipefail
V=${1:?usage: scripts/simulate_gpu_host.sh VENV [CARRY_FILE]}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CARRY=${2-$ROOT/requirements-gpu-host.txt}
PY=${PY312:-${PYTHON312:-}}
for c in $PY ~/.pyenv/versions/3.12.*/bin/python "$(command -v python3.12 || true)" "$(command -v python3 || true)"; do
  if [ -n "$c" ] && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then PY=$c; break; fi
done
"${PY:-false}" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null || { echo "no Python 3.12 found (set PY312)"; exit 1; }
t0=$SECONDS
"$PY" -m venv "$V"
"$V/bin/python" -m pip install -q --upgrade pip
grep -v '^#' "$ROOT/tests/gpu_host_packages.txt" | grep -v '^$' > "$V/host.txt"
"$V/bin/python" -m pip install -q -r "$V/host.txt"
if [ -n "$CARRY" ]; then "$V/bin/python" -m pip install -q --no-deps -r "$CARRY"; fi
"$V/bin/python" -m pip install -q --no-deps -e "$ROOT"
echo "ready: $V in $((SECONDS - t0)) s ($("$V/bin/python" -c 'import jax,flax; print("jax", jax.__version__, "flax", flax.__version__)'))"
