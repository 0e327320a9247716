#!/usr/bin/env bash
# The default model in one GPU window (one H100 / H200, a 10-minute run): trains configs/default_gpu.py
# (train.max_minutes stops it in time to export), fits the automatic task choice's head on procedural
# images, and leaves what a window can bring back -- a few files, one folder deep -- in OUT:
#   model.tgz       the exported model folder (export/: parameters, config, task_head.json)
#   metrics.jsonl   every step's loss;  config.json  the run's config;  train.log  what the run printed
#   scripts/gpu_default_model.sh OUT [--config.FIELD=VALUE ...]    (RUN=folder for the run, default a temp one)
# On a bare GPU host the wheels of requirements-gpu-host.txt come first (docs/gpu_host.md).
set -euo pipefail
OUT=${1:?usage: scripts/gpu_default_model.sh OUT [--config.FIELD=VALUE ...]}
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUN=${RUN:-$(mktemp -d /tmp/dd_jax_default_gpu.XXXXXX)/run}
PY=${PYTHON:-python}
mkdir -p "$OUT"
cd "$ROOT"
"$PY" -m dd_jax.train --config configs/default_gpu.py --workdir "$RUN" "$@" 2>&1 | tee "$OUT/train.log"
"$PY" -m dd_jax.inference --procedural "${HEAD_IMAGES:-48}" --size 128 --checkpoint "$RUN/export" --overwrite \
  2>&1 | tee -a "$OUT/train.log"
tar -C "$RUN" -czf "$OUT/model.tgz" export
cp "$RUN/metrics.jsonl" "$RUN/config.json" "$OUT/"
ls -l "$OUT"
