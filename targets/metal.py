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

from g4c.errors import G4CError
from g4c.targets.base import Target, module_tree

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


def metal_target(profile: str = DEFAULT_PROFILE) -> Target:
    if profile not in PROFILES:
        raise G4CError(f"unknown Metal profile {profile!r}: available profiles are {', '.join(PROFILES)}")
    @functools.cache  # made once, when first needed: creating it needs the compiler
    def tvm_target():
        import tvm

        host = {"kind": "llvm", "mtriple": HOST_TRIPLE, "mcpu": PROFILES[profile]}
        return tvm.target.Target({"kind": "metal", "max_num_threads": 256}, host=host)

    def schedule(name: str, func):
        from g4c.targets.vulkan import gpu_schedule

        # dlight's Metal GEMM rule (simdgroup matrices) imports TVM's tensor-intrinsic registry, ~75 s per
        # compile on 2 cores: prefill linears are g4c's tiled GEMM instead (option tiled_gemm)
        return gpu_schedule(tvm_target(), matmul=False)(name, func)

    def export(lib, path: str) -> None:
        from pathlib import Path

        from tvm.support import tar

        directory = Path(path).parent
        lib.export_library(str(directory / "kernels.tar"), fcompile=tar.tar)
        sources = [m.inspect_source() for m in module_tree(lib.mod) if m.kind == "metal"]
        (directory / "kernels.metal").write_text("\n".join(sources))
        (directory / "link.sh").write_text(LINK_SCRIPT)
        (directory / "link.sh").chmod(0o755)

    return Target(f"metal:{profile}", tvm_target, schedule, export=export,
                  options={"profile": profile, "shared_memory": 32 << 10, "tiled_gemm": True},
                  gpu=True, device="metal", relax_pipeline=lambda: _pipeline(tvm_target()), library="kernels.dylib",
                  static_decode=True)  # one-token decode: its linears are one-row GEMV kernels


def _pipeline(tvm_target):
    from g4c.targets.cuda import relax_pipeline

    return relax_pipeline(tvm_target)
