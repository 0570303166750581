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
import shutil
import struct

from g4c.errors import G4CError
from g4c.targets.base import Target, module_tree

ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
DEFAULT_ARCH = "sm_90"  # H100
BLOB_SYMBOL = "__tvm_ffi__library_bin"


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


def cuda_target(arch: str = DEFAULT_ARCH) -> Target:
    if arch not in ARCHS:
        raise G4CError(f"unknown CUDA arch {arch!r}: available archs are {', '.join(ARCHS)}")
    @functools.cache  # made once, when first needed: creating it needs the compiler
    def tvm_target():
        import tvm

        from g4c.targets.llvm import _tvm_target as host

        return tvm.target.Target({"kind": "cuda", "arch": arch}, host=host())

    def schedule(name: str, func):
        from g4c.targets.vulkan import gpu_schedule

        return gpu_schedule(tvm_target())(name, func)

    def compile_fatbin(source: str) -> bytes:
        from tvm.support import nvcc

        with tvm_target():  # nvcc's flags depend on the current target
            return bytes(nvcc.compile_cuda(source, target_format="fatbin", arch=arch, compiler="nvcc"))

    def export(lib, path: str) -> None:
        import os

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
                f.write(_c_array(fatbin_blob(blob, sources, compile_fatbin)))
            return source

        lib.export_library(path, fpack_imports=pack_imports)

    return Target(f"cuda:{arch}", tvm_target, schedule, export=export,
                  options={"arch": arch, "shared_memory": 48 << 10}, gpu=True,
                  device="cuda", relax_pipeline=lambda: relax_pipeline(tvm_target(), cuda_graph=True), static_decode=True)


def relax_pipeline(tvm_target, cuda_graph: bool = False):
    """TVM's CUDA pipeline without operator fusion and reshape rewriting: g4c's kernels are fused and
    scheduled already (FuseTIR would merge them across their int32/int64 shape variables, and
    RewriteDataflowReshape only reads block-form TIR); helpers such as `take_last` and the legalized
    reshape get dlight schedules.

    CUDA graphs (`cuda_graph`, CUDA only: Metal shares this pipeline without them): with
    `relax.backend.use_cuda_graph`, RewriteCUDAGraph lifts the kernel launches of
    the static decode function (one token, every parameter fixed, intermediates in static storage)
    into a capture function: the runtime's first decode step runs it, captures it as a CUDA graph,
    and every later step replays the graph with one launch (`vm.builtin.cuda_graph.run_or_capture`,
    part of libtvm_runtime_cuda). Prefill functions have symbolic token counts and runtime inputs,
    so they are left as plain launches."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cuda import pipeline as cuda
    from tvm.s_tir import dlight as dl

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with tvm_target:
            passes = [relax.transform.LegalizeOps(),
                      dl.ApplyDefaultSchedule(dl.gpu.GEMV(), dl.gpu.Matmul(), dl.gpu.Reduction(),
                                              dl.gpu.GeneralReduction(), dl.gpu.Fallback())]
            passes += [relax.transform.ToNonDataflow(), relax.transform.RemovePurityChecking(),
                       relax.transform.CallTIRRewrite()] + cuda.finalize_passes(tvm_target)
            with tvm.transform.PassContext(opt_level=3, config={"relax.backend.use_cuda_graph": cuda_graph}):
                return tvm.transform.Sequential(passes)(mod)

    return _pipeline


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
