"""Apple GPUs (`metal`, `metal:<profile>` for apple-m1 … apple-m4): Metal Shading Language kernels
(TVM's Metal codegen, the GPU schedules every GPU target shares) plus an arm64-macOS host module.

Built on Linux, linked on the Mac: the artifact holds `kernels.tar` (the host object and the packed
device module, whose MSL the Metal runtime compiles when the library loads, as macOS provides), the
MSL alone in `kernels.metal` for inspection, and `link.sh`, which makes `kernels.dylib` with the
Xcode command-line tools. The macOS `apache-tvm-ffi` wheel plus TVM's `libtvm_runtime.dylib` (Metal
enabled) then run it like any other artifact.
"""

from __future__ import annotations

import functools
from pathlib import Path

from g4c.targets.base import Requirements, module_tree
from g4c.targets.gpu import GpuTarget, gpu_lowering
from g4c.targets.registry import TargetKind

PROFILES = {"apple-m1": "apple-m1", "apple-m2": "apple-m2", "apple-m3": "apple-m3", "apple-m4": "apple-m4"}
DEFAULT_PROFILE = "apple-m1"  # the code runs on every later Apple-silicon Mac
HOST_TRIPLE = "arm64-apple-macos"
LINK_SCRIPT = """#!/bin/sh
# Link the Metal artifact's host module on a Mac (Xcode command-line tools): makes kernels.dylib.
set -e
cd "$(dirname "$0")"
work=$(mktemp -d)
tar -xf kernels.tar -C "$work"
for c in "$work"/*.c; do [ -e "$c" ] && clang -c -O2 -fPIC "$c" -o "${c%.c}.o"; done
clang -dynamiclib -undefined dynamic_lookup -o kernels.dylib "$work"/*.o
rm -rf "$work"
echo "linked $(pwd)/kernels.dylib"
"""


class MetalTarget(GpuTarget):
    """`metal:<profile>`: Apple GPUs; MSL + arm64-macOS host objects, linked on the Mac."""

    # dlight's Metal GEMM rule (simdgroup matrices) imports TVM's tensor-intrinsic registry, a long
    # delay per compile: prefill linears are g4c's tiled GEMM instead
    matmul_rule = False
    lowering = gpu_lowering(32 << 10, tiled_gemm=True)

    def __init__(self, profile: str = DEFAULT_PROFILE):
        self.profile = profile
        self.name = f"metal:{profile}"

    @functools.cache
    def tvm_target(self):
        import tvm

        host = {"kind": "llvm", "mtriple": HOST_TRIPLE, "mcpu": PROFILES[self.profile]}
        return tvm.target.Target({"kind": "metal", "max_num_threads": 256}, host=host)

    def export(self, lib, directory: Path) -> None:
        from tvm.support import tar

        lib.export_library(str(directory / "kernels.tar"), fcompile=tar.tar)
        sources = [m.inspect_source() for m in module_tree(lib.mod) if m.kind == "metal"]
        (directory / "kernels.metal").write_text("\n".join(sources))
        (directory / "link.sh").write_text(LINK_SCRIPT)
        (directory / "link.sh").chmod(0o755)

    def requirements(self) -> Requirements:
        return Requirements(library="kernels.dylib", device="metal", device_type=8,
                            runtime_libraries=("libtvm_runtime.dylib",),  # TVM's macOS wheel: Metal built in
                            machines=("arm64",), system="Darwin", platform="macOS, Metal",
                            prepare="run link.sh in it on the Mac first")


KIND = TargetKind("metal", MetalTarget, "Apple GPUs; MSL + arm64-macOS objects, linked on the Mac",
                  tuple(PROFILES), DEFAULT_PROFILE, order=4, title="Metal")
