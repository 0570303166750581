#!/usr/bin/env bash
# On a GPU machine, from the repository root: parity of the CUDA artifacts with transformers on the
# test checkpoints, then the E2B-shaped benchmark (g4c vs transformers eager on the same GPU and
# weights, decode roofline). Needs python3 with torch, transformers, numpy, safetensors, ml_dtypes,
# typer, rich (the device image has them) and the bundle from scripts/gpu_prepare.sh; no TVM compiler,
# no network. Results: stdout, and $OUT/gpu_check.{md,json} when OUT is set.
# Usage: scripts/gpu_check.sh [BUNDLE [gpu_check.py options]]; within a 10-minute device call, run
# `--skip-benchmark` (parity, ~2 min) and `--skip-parity` (E2B benchmark) as two calls.
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${1:-gpu-bundle}
shift || true
SITE=${G4C_SITE:-/tmp/g4c-site}
if ! python3 -c "import tvm_ffi" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$BUNDLE"/wheels/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # the g4c package (its runtime needs no compiler)
export PYTHONUNBUFFERED=1
python3 scripts/gpu_check.py "$BUNDLE" ${OUT:+--out "$OUT"} "$@"
