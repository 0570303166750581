"""NVIDIA GPUs (`cuda`, `cuda:<arch>` with arch sm_80, sm_86, sm_89, sm_90): TVM's CUDA codegen with the
GPU schedules every GPU target shares (`g4c.codegen.gpu_kernels` + dlight).

TVM 0.27 stores CUDA *source* in the exported library and compiles it when the library is loaded,
through a Python callback of the compiler package, which a device without the compiler lacks. g4c
compiles ahead of time instead: at export, each CUDA module's source goes through nvcc to a fatbin
(SASS for the arch) and the module is re-serialised with format "fatbin", which TVM's CUDA runtime
loads directly (`cuModuleLoadData`). Nothing is compiled at load time.
"""

from __future__ import annotations

import functools
import os
import shutil
import struct
from pathlib import Path

from g4c.errors import G4CError
from g4c.targets.base import Requirements, Toolchain, host_runtime_libraries, module_tree, vm_toolchain
from g4c.targets.gpu import GpuTarget, gpu_lowering
from g4c.targets.llvm import host_tvm_target
from g4c.targets.registry import TargetKind

ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
DEFAULT_ARCH = "sm_90"  # H100
BLOB_SYMBOL = "__tvm_ffi__library_bin"
SHARED_MEMORY = 48 << 10  # per block without opting in to more
RUNTIME_LIBRARIES = ("libtvm_runtime.so", "libcudart.so.13", "libtvm_runtime_cuda.so")


def _u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def fatbin_blob(blob: bytes, sources: list[str], compile_fatbin) -> bytes:
    """The serialised import tree `blob` (TVM's `__tvm_ffi__library_bin`: u64 length, then modules as
    kind string + u64 size + bytes) with every CUDA module's (fmt "cuda", function map, source)
    replaced by (fmt "fatbin", function map, nvcc's fatbin of that source)."""
    marker = _u64(4) + b"cuda"
    out, pos = bytearray(), 8
    replaced = 0
    while True:
        hit = blob.find(marker, pos)
        if hit < 0 or blob[hit + 12 + 8: hit + 12 + 8 + 12] != marker:  # kind "cuda", size, fmt "cuda"
            if hit < 0:
                break
            out += blob[pos: hit + 1]
            pos = hit + 1
            continue
        out += blob[pos: hit + 12]
        size = struct.unpack_from("<Q", blob, hit + 12)[0]
        block = blob[hit + 20: hit + 20 + size]
        source = next((s.encode() for s in sources if block.endswith(s.encode())), None)
        if source is None or struct.unpack_from("<Q", block, len(block) - len(source) - 8)[0] != len(source):
            raise G4CError("unexpected layout of TVM's serialised CUDA module: cannot embed a fatbin")
        function_map = block[12: len(block) - len(source) - 8]
        fatbin = compile_fatbin(source.decode())
        new_block = _u64(6) + b"fatbin" + function_map + _u64(len(fatbin)) + fatbin
        out += _u64(len(new_block)) + new_block
        pos = hit + 20 + size
        replaced += 1
    out += blob[pos:]
    if replaced == 0:
        raise G4CError("no CUDA module found in the library")
    return _u64(len(out)) + bytes(out)


def _c_array(blob: bytes) -> str:
    rows = (",".join(f"0x{b:02x}" for b in blob[i: i + 32]) for i in range(0, len(blob), 32))
    return (f'#ifdef __cplusplus\nextern "C" {{\n#endif\nextern const unsigned char {BLOB_SYMBOL}[];\n'
            f"const unsigned char {BLOB_SYMBOL}[{len(blob)}] = {{\n" + ",\n".join(rows) +
            "\n};\n#ifdef __cplusplus\n}\n#endif\n")


class CudaTarget(GpuTarget):
    """`cuda:<arch>`: an NVIDIA GPU; kernels compiled ahead of time to a fatbin by nvcc."""

    lowering = gpu_lowering(SHARED_MEMORY)
    cuda_graph = True

    def __init__(self, arch: str = DEFAULT_ARCH):
        self.arch = arch
        self.name = f"cuda:{arch}"

    @functools.cache
    def tvm_target(self):
        import tvm

        return tvm.target.Target({"kind": "cuda", "arch": self.arch, "max_shared_memory_per_block": SHARED_MEMORY},
                                 host=host_tvm_target())

    def compile_fatbin(self, source: str) -> bytes:
        from tvm.support import nvcc

        with self.tvm_target():  # nvcc's flags depend on the current target
            return bytes(nvcc.compile_cuda(source, target_format="fatbin", arch=self.arch, compiler="nvcc"))

    def export(self, lib, directory: Path) -> None:
        import numpy as np
        import tvm_ffi

        if shutil.which("nvcc") is None:
            raise G4CError("--target cuda compiles its kernels ahead of time with nvcc: install the CUDA toolkit")
        sources = [m.inspect_source() for m in module_tree(lib.mod) if m.kind == "cuda"]
        pack = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")

        def pack_imports(mod, is_system_lib, prefix, workspace_dir):
            blob = np.from_dlpack(pack(mod)).tobytes()
            source = os.path.join(workspace_dir, f"{prefix}devc.c")
            with open(source, "w") as f:
                f.write(_c_array(fatbin_blob(blob, sources, self.compile_fatbin)))
            return source

        lib.export_library(str(directory / self.requirements().library), fpack_imports=pack_imports)

    def inspect_module(self, module) -> dict:
        return {"decode_graph": decode_graph(module)}

    def requirements(self) -> Requirements:
        return Requirements(device="cuda", device_type=2, runtime_libraries=RUNTIME_LIBRARIES)

    def bundled_libraries(self) -> list[str]:
        return list(RUNTIME_LIBRARIES)

    def embed_toolchain(self) -> Toolchain:
        return vm_toolchain("g++", host_runtime_libraries(RUNTIME_LIBRARIES))  # the GPU driver provides libcuda


KIND = TargetKind("cuda", CudaTarget, "NVIDIA GPUs; fatbin built with nvcc", ARCHS, DEFAULT_ARCH,
                  profile_option="arch", order=3, title="CUDA")


def kernel_launches(mod) -> dict[str, int]:
    """Kernel calls per Relax function of a lowered module (calls of its TensorIR functions)."""
    from tvm import relax, tirx

    counts = {}
    for gvar, func in mod.functions.items():
        if isinstance(func, relax.Function):
            calls = [b.value for block in func.body.blocks for b in block.bindings if isinstance(b.value, relax.Call)]
            counts[gvar.name_hint] = sum(isinstance(c.op, relax.GlobalVar) and isinstance(mod[c.op], tirx.PrimFunc)
                                         for c in calls)
    return counts


def decode_graph(mod) -> dict[str, int]:
    """How a lowered module's decode step launches its kernels: `captured` in its CUDA graph (one
    replay per step), `outside` as plain launches (those writing the returned logits)."""
    counts = kernel_launches(mod)
    return {"captured": sum(n for name, n in counts.items() if name.startswith("decode_cuda_graph_capture")),
            "outside": counts.get("decode", 0)}
