"""What every GPU target shares (Vulkan, CUDA, Metal): the GPU kernels, dlight schedules, the Relax
pipeline and the lowering options. A GPU target module subclasses `GpuTarget` and sets its TVM
target, its shared memory, its build and its requirements.

Kernels: the hand-written GPU kernels of `g4c.codegen.gpu_kernels` (attention split over key ranges
and tiled over queries for prefill, head norm + RoPE, cache writes, MoE router and experts, grouped
GEMMs, sliced embedding), which arrive scheduled; every other op is a CPU kernel builder whose
PrimFunc dlight's GEMV/GEMM/reduction/fallback rules schedule for the GPU.
"""

from __future__ import annotations

from g4c.codegen.spec import KernelSpec, LoweringOptions
from g4c.targets.base import RelaxVMTarget
from g4c.targets.llvm import cpu_builders

WEBGPU_SHARED_MEMORY = 16384  # bytes per workgroup WebGPU guarantees


def gpu_lowering(shared_memory: int, max_binding: int | None = None, tiled_gemm: bool = False) -> LoweringOptions:
    return LoweringOptions(index_dtype="int32", split_attention=True, split_moe=True, decode_gemv=True,
                           tiled_gemm=tiled_gemm, shared_memory=shared_memory, max_binding=max_binding,
                           quant_word="uint32", quant_scale="float32")


def gpu_builders() -> dict:
    from g4c.codegen import gpu_kernels as gpu

    return {**cpu_builders(), "cache_write": gpu.cache_write, "head_norm_rope": gpu.head_norm_rope,
            "router_topk": gpu.router_topk, "attention_split": gpu.attention,
            "prefill_attention_split": gpu.prefill_attention, "attention_merge": gpu.attention_merge,
            "linear_tiled": gpu.linear_tiled, "place_columns": gpu.place_columns, "embed_rows": gpu.embed_rows,
            "moe_gate_up": gpu.moe_gate_up, "moe_down": gpu.moe_down, "moe_align": gpu.moe_align,
            "moe_gate_up_grouped": gpu.moe_gate_up_grouped, "moe_down_grouped": gpu.moe_down_grouped,
            "moe_combine": gpu.moe_combine, "local_attention": gpu.local_attention}


def gpu_schedule(tvm_target, name: str, func, matmul: bool = True):
    """`func` scheduled for a GPU: hand-written GPU kernels are kept, everything else goes through
    dlight's GEMV/GEMM/reduction/fallback rules (`matmul=False` leaves GEMMs to the fallback rule)."""
    import tvm
    from tvm.s_tir import dlight as dl

    if func.attrs is not None and "tirx.is_scheduled" in func.attrs:
        return func
    rules = [dl.gpu.GEMV()] + ([dl.gpu.Matmul()] if matmul else [])
    rules += [dl.gpu.Reduction(), dl.gpu.GeneralReduction()]
    with tvm_target:
        mod = dl.ApplyDefaultSchedule(*[_tolerant(r) for r in rules], dl.gpu.Fallback())(tvm.IRModule({name: func}))
    return mod[name]


def _tolerant(rule):
    """A dlight rule that declines (returns None) where it would raise: dlight's reduction rules raise
    on some patterns they do not handle (a quantized weight's decode inlined into a GEMV), and the next
    rule should get the kernel instead."""
    from tvm.s_tir import dlight as dl

    class Tolerant(dl.ScheduleRule):
        def apply(self, func, target, tunable):
            try:
                return rule.apply(func, target, tunable)
            except Exception:  # noqa: BLE001 - a rule that cannot handle the pattern
                return None

    return Tolerant()


class GpuTarget(RelaxVMTarget):
    matmul_rule = True  # dlight's GEMM rule for prefill linears (else `linear_tiled`)
    static_decode = True  # one-token decode: its linears are one-row GEMV kernels
    cuda_graph = False

    def builders(self) -> dict:
        return gpu_builders()

    def schedule(self, spec: KernelSpec, func, knobs: dict | None = None):  # no knob space yet: knobs unused
        return gpu_schedule(self.tvm_target(), spec.name, func, self.matmul_rule)

    def relax_pipeline(self):
        return relax_pipeline(self.tvm_target(), self.cuda_graph)


def relax_pipeline(tvm_target, cuda_graph: bool = False):
    """TVM's CUDA pipeline without operator fusion and reshape rewriting: g4c's kernels are fused and
    scheduled already (FuseTIR would merge them across their int32/int64 shape variables, and
    RewriteDataflowReshape only reads block-form TIR); helpers such as `take_last` and the legalized
    reshape get dlight schedules. Metal uses it too.

    CUDA graphs (`cuda_graph`): with `relax.backend.use_cuda_graph`, RewriteCUDAGraph lifts the
    kernel launches of the static decode function (one token, every parameter fixed, intermediates in
    static storage) into a capture function: the runtime's first decode step runs it, captures it as
    a CUDA graph, and every later step replays the graph with one launch
    (`vm.builtin.cuda_graph.run_or_capture`, part of libtvm_runtime_cuda). Prefill functions have
    symbolic token counts and runtime inputs, so they are left as plain launches."""
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
