#!/usr/bin/env bash
# Run a command inside an emulated aarch64 Linux with g4c's runtime importable:
#
#   scripts/arm-emu.sh g4c logits ART --tokens 5,6,7 -o out.npy     # ART compiled with --target arm
#   scripts/arm-emu.sh python -c "import platform; print(platform.machine())"
#
# First use builds the environment (needs root for apt, ~1 min, ~700 MB under $G4C_CACHE/arm): Debian's
# qemu-user, an arm64 Python 3.11 sysroot (Debian bookworm packages unpacked, not installed), and
# aarch64 wheels of g4c's runtime dependencies (apache-tvm-ffi, numpy, safetensors, and only
# libtvm_runtime.so out of apache-tvm: no compiler, as on a device). `g4c` and `python` then run under qemu-aarch64 with
# QEMU_CPU=${QEMU_CPU:-cortex-a76} (the Raspberry Pi 5 core: instructions it lacks fault, as on the
# board). The repository's g4c is installed into the sysroot on every call, so edits are picked up; it is
# built by the host's python3 (a venv or the system's) against setuptools/wheel wheels downloaded once
# under $G4C_CACHE/arm/build, so neither the host's own setuptools nor the network matters after setup.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${G4C_CACHE:-$HOME/.cache/g4c}/arm"
SYSROOT="$CACHE/sysroot"
SITE="$CACHE/site"
BUILD="$CACHE/build"
PY=3.11

setup_host_tools() {
  command -v qemu-aarch64 >/dev/null && command -v aarch64-linux-gnu-gcc >/dev/null && return
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null
}

setup_sysroot() {
  [ -x "$SYSROOT/usr/bin/python$PY" ] && return
  local apt="$CACHE/apt"
  rm -rf "$apt" "$SYSROOT.partial" && mkdir -p "$apt/lists/partial" "$apt/archives/partial" "$SYSROOT.partial"
  # a private apt that sees only arm64 bookworm and believes nothing is installed, so it downloads
  # python3.11's whole dependency closure
  cat > "$apt/sources.list" <<EOF
deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
EOF
  : > "$apt/status"
  local opts=(-o "APT::Architecture=arm64" -o "APT::Architectures=arm64" -o "Dir::Etc::SourceList=$apt/sources.list"
              -o "Dir::Etc::SourceParts=-" -o "Dir::State::Lists=$apt/lists" -o "Dir::State::status=$apt/status"
              -o "Dir::Cache::Archives=$apt/archives" -o "Debug::NoLocking=1")
  apt-get "${opts[@]}" update -qq 2>/dev/null
  apt-get "${opts[@]}" install -y -qq --download-only --no-install-recommends "python$PY" libgomp1 libstdc++6 >/dev/null 2>&1
  for deb in "$apt"/archives/*.deb; do dpkg -x "$deb" "$SYSROOT.partial"; done
  mv "$SYSROOT.partial" "$SYSROOT"
  rm -rf "$apt"
}

setup_site() {
  [ -f "$SITE/.complete" ] && return
  rm -rf "$SITE" && mkdir -p "$SITE"
  python3 -m pip install -q --target "$SITE" --only-binary=:all: \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
    --python-version "$PY" --implementation cp --abi "cp${PY/./}" --abi abi3 --abi none \
    apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 numpy ml_dtypes safetensors typer rich click
  # devices get no compiler: keep only TVM's runtime library, drop the 300 MB `tvm` package
  mkdir -p "$SITE/.lib" && mv "$SITE/tvm/lib/libtvm_runtime.so" "$SITE/.lib/" && rm -rf "$SITE/tvm" "$SITE"/apache_tvm-*
  touch "$SITE/.complete"
}

setup_build() {
  [ -f "$BUILD/.complete" ] && return
  rm -rf "$BUILD" && mkdir -p "$BUILD"
  # pyproject's build-system.requires (setuptools>=68; wheel too, which setuptools < 70.1 asks for). The
  # host's own setuptools is not used: a fresh venv's or Debian's (65/66, no wheel) fails with
  # "invalid command 'bdist_wheel'" under --no-build-isolation.
  python3 -m pip download -q --only-binary=:all: -d "$BUILD" "setuptools>=68" wheel
  touch "$BUILD/.complete"
}

setup_host_tools
setup_sysroot
setup_site
setup_build
# g4c itself (pure Python), from this checkout, built in an isolated environment from $BUILD's wheels
python3 -m pip install -q --no-deps --no-index --find-links "$BUILD" --upgrade --target "$SITE/.g4c" "$ROOT" >/dev/null

cmd="${1:?usage: scripts/arm-emu.sh g4c|python ARGS...}"
shift
case "$cmd" in
  g4c) set -- -m g4c.cli "$@" ;;
  python|python3) ;;
  *) echo "arm-emu.sh: run 'g4c ...' or 'python ...'" >&2; exit 2 ;;
esac
export QEMU_CPU="${QEMU_CPU:-cortex-a76}" QEMU_LD_PREFIX="$SYSROOT"
export PYTHONPATH="$SITE/.g4c:$SITE" PYTHONHOME="$SYSROOT/usr" G4C_TVM_RUNTIME="$SITE/.lib/libtvm_runtime.so"
# -P: the working directory (a checkout, whose g4c/ lacks the mapped subpackages) is not on sys.path
exec qemu-aarch64 -L "$SYSROOT" "$SYSROOT/usr/bin/python$PY" -P "$@"
