#!/usr/bin/env bash
# Build what scripts/gpu_check.sh needs on a GPU machine that has no compiler and no network:
#   BUNDLE/checkpoints/{e,moe,dense}   the test checkpoints (tiny, written by transformers)
#   BUNDLE/artifacts/{e,moe,dense}     their CUDA artifacts (fatbin + bundled TVM runtime; e with its C runtime)
#   BUNDLE/generate-c                  examples/generate.c linked with e's lib/libg4c.so
#   BUNDLE/artifacts/e2b               E2B-shaped, full depth, bf16 weights regenerated from the seed
#   BUNDLE/wheels/                     apache-tvm-ffi for the device's Python (3.12)
# gpu-bundle/ is git-ignored: name it in the device tool's `carry`.
# Usage (repository root, g4c installed with [test]): scripts/gpu_prepare.sh [BUNDLE] ; default gpu-bundle.
# G4C_CHECK_TARGET=llvm builds a CPU bundle instead, to dry-run gpu_check.sh on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${1:-gpu-bundle}
TARGET=${G4C_CHECK_TARGET:-cuda:sm_90}
E2B_LAYERS=${G4C_E2B_LAYERS:-}   # empty: full depth (35 layers)
rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/checkpoints" "$BUNDLE/artifacts" "$BUNDLE/wheels"

python - "$BUNDLE/checkpoints" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from hf_reference import FAMILIES, hf_config, make_checkpoint
for i, (name, kwargs) in enumerate(FAMILIES.items()):
    if name in ("e", "moe", "dense"):
        make_checkpoint(Path(sys.argv[1]) / name, hf_config(kwargs), seed=i + 1)
PY
BUNDLE_OPT=--bundle-runtime
[ "$TARGET" = llvm ] && BUNDLE_OPT=""
for family in e moe dense; do  # the C runtime (7 MB of libraries) only in e's: the carry limit is 64 MiB
  EMBED_OPT=--no-embed; [ "$family" = e ] && EMBED_OPT=""
  g4c compile "$BUNDLE/checkpoints/$family" --target "$TARGET" $BUNDLE_OPT $EMBED_OPT -o "$BUNDLE/artifacts/$family"
done
# examples/generate.c linked with e's C runtime, found relative to the binary on the GPU machine
gcc -O2 -std=c99 -D_POSIX_C_SOURCE=200809L examples/generate.c -o "$BUNDLE/generate-c" \
  -I"$BUNDLE/artifacts/e/include" -L"$BUNDLE/artifacts/e/lib" -lg4c -Wl,-rpath,'$ORIGIN/artifacts/e/lib'
g4c compile e2b --random-weights --seed 0 ${E2B_LAYERS:+--layers $E2B_LAYERS} --dtype bf16 --weights-from-seed \
  --target "$TARGET" $BUNDLE_OPT -o "$BUNDLE/artifacts/e2b"
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$BUNDLE/wheels" "apache-tvm-ffi==0.1.14.post1"
du -sh "$BUNDLE"
echo "carry it (<= 64 MiB): run(command='scripts/gpu_check.sh $BUNDLE --skip-benchmark', carry=['$BUNDLE']),"
echo "then the same with --skip-parity (each part fits a 10-minute device call)"
