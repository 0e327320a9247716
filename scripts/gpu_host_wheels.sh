#!/usr/bin/env bash
# Downloads the wheels requirements-gpu-host.txt lists, for a GPU host (CPython 3.12, Linux x86_64, glibc >= 2.28),
# into OUTDIR, without their dependencies (the host has them): the folder to carry there (docs/gpu_host.md).
#   scripts/gpu_host_wheels.sh OUTDIR [REQUIREMENTS]      (REQUIREMENTS: default requirements-gpu-host.txt)
# grain 0.2.18's wheel is tagged manylinux_2_24 / manylinux_2_28, array_record 0.8.6's manylinux2014 / manylinux_2_17,
# the rest py3-none-any; older pips do not widen one --platform to the older manylinux tags, so each is named.
set -euo pipefail
OUT=${1:?usage: scripts/gpu_host_wheels.sh OUTDIR [REQUIREMENTS]}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
REQ=${2:-$ROOT/requirements-gpu-host.txt}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$OUT" -r "$REQ"
want=$(grep -cE '^[A-Za-z0-9_.-]+==' "$REQ")
got=$(find "$OUT" -maxdepth 1 -name '*.whl' | wc -l)
[ "$got" -ge "$want" ] || { echo "expected $want wheels in $OUT, found $got" >&2; exit 1; }
ls -l "$OUT"/*.whl | awk '{ printf "%9d  %s\n", $5, $NF }'
echo "total: $(du -cb "$OUT"/*.whl | tail -1 | cut -f1) bytes ($(du -ch "$OUT"/*.whl | tail -1 | cut -f1)) in $got wheels"
