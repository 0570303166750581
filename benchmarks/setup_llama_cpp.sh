#!/usr/bin/env bash
# Benchmark set-up (not part of CI): build llama-cpp-python from source and unpack its vendored
# llama.cpp, whose convert_hf_to_gguf.py, gguf-py and Gemma 4 vocabulary benchmarks/compare.py uses.
#
#   bash benchmarks/setup_llama_cpp.sh          # installs into the current Python
#
# The sdist is unpacked under ${G4C_CACHE:-~/.cache/g4c}/llama-cpp-python-$VERSION; the build uses
# every core (about 10 minutes on 2 cores). CPU build with OpenMP and -march=native, as pip does by default.
set -euo pipefail
VERSION=0.3.36
CACHE="${G4C_CACHE:-$HOME/.cache/g4c}"
SRC="$CACHE/llama-cpp-python-$VERSION"
mkdir -p "$CACHE"

if [ ! -f "$SRC/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
  tmp="$(mktemp -d "$CACHE/sdist.XXXXXX")"
  python -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
  tar xzf "$tmp/llama_cpp_python-$VERSION.tar.gz" -C "$tmp"
  rm -rf "$SRC" && mv "$tmp/llama_cpp_python-$VERSION" "$SRC" && rm -rf "$tmp"
fi

if ! python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" python -m pip install -v "$SRC"
fi
# The converter must come from the same llama.cpp as the library (gguf-py evolves with it).
python -m pip install "$SRC/vendor/llama.cpp/gguf-py" matplotlib
echo "llama.cpp sources: $SRC/vendor/llama.cpp"
