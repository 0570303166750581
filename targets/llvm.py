"""The x86/host `llvm` target: TVM's LLVM codegen for this CPU, with CPU schedules.

Decode's one-token linears (GEMVs, `linear` with rows=1) are the decode cost: their schedule splits
the reduction into SIMD-width chunks kept as partial sums (rfactor), parallelises over output columns
and vectorises the partial sums, so each thread streams contiguous weight rows. Prefill's linears are
register-blocked GEMMs (`targets.cpu_gemm`). Attention is the prefill cost: Q·K runs as the
same SIMD partial-sum dot products per (query, head), P·V streams V rows with the head_dim
vectorised. Other kernels are parallelised over their outermost data-parallel loop.
"""

from __future__ import annotations

import functools
import os
import platform

from g4c.codegen.spec import KernelSpec
from g4c.targets import cpu_gemm
from g4c.targets.base import RelaxVMTarget, Requirements, Toolchain, host_runtime_libraries, vm_toolchain
from g4c.targets.registry import TargetKind

VECTOR = 16
COLUMNS_PER_TASK = 8
KEY_TILE = 32  # keys per attention task
VALUE_SLICE = 64  # head_dim elements per P·V task


def _cpu_name() -> str:
    import tvm

    get = getattr(tvm.target.codegen, "llvm_get_system_cpu", None)
    return get() if get else "x86-64"


@functools.cache
def host_tvm_target():
    """This CPU as a TVM target (also the host side of the GPU targets)."""
    import tvm

    return tvm.target.Target({"kind": "llvm", "mcpu": os.environ.get("G4C_MCPU", _cpu_name()),
                              "num-cores": os.cpu_count() or 1})


def _schedule_linear(func, reduction: int, vector: int = VECTOR, columns: int = COLUMNS_PER_TASK):
    """The one-token GEMV of `linear` / `linear_q` (rows=1): quantized weights are dequantized inside
    the reduction."""
    import tvm
    from tvm import s_tir

    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    if _has_block(sch, "w_deq"):
        sch.compute_inline(sch.get_sblock("w_deq"))
    if reduction % vector:
        return sch.mod["main"]
    block = sch.get_sblock("y")
    i, j, k = sch.get_loops(block)
    ko, ki = sch.split(k, [None, vector])
    rf = sch.rfactor(ki, 2)
    ri, rj, rko, rki = sch.get_loops(rf)
    rjo, rji = sch.split(rj, [None, columns])
    sch.reorder(rjo, ri, rko, rji, rki)
    sch.parallel(rjo)
    sch.vectorize(rki)
    sch.reverse_compute_at(block, ri)
    sch.decompose_reduction(rf, rko)
    return sch.mod["main"]


def _schedule_attention(func, key_tile: int = KEY_TILE, value_slice: int = VALUE_SLICE):
    """codegen.kernels.attention: blocks dots, scores, mx, ex, den, acc, out (+ k_unrotated, k_cache
    when K is rebuilt from V). GQA-aware: the `group` query heads that share a KV head are computed
    together, so every K/V row is read from memory once and reused from L1 (group× fewer K/V reads at
    long context)."""
    import tvm
    from tvm import s_tir

    shapes = {param.name: list(param.shape) for param in func.params}
    _, q_heads, head_dim = (int(x) if i else x for i, x in enumerate(shapes["q"]))
    group = q_heads // int(shapes["v_cache"][1])
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    sch.compute_inline(sch.get_sblock("scores"))  # mask + scale: cheaper to recompute than to store
    if _has_block(sch, "k_cache"):
        sch.compute_inline(sch.get_sblock("k_unrotated"))
        sch.parallel(sch.get_loops(sch.get_sblock("k_cache"))[0])
    # dots[i, h, j] = q[i, h, :] . k[j, h // group, :]: tiles of KEY_TILE keys in parallel; each key row
    # serves its `group` query heads as SIMD-width partial sums over head_dim
    dots = sch.get_sblock("dots")
    *_, d = sch.get_loops(dots)
    _, d_inner = sch.split(d, [None, VECTOR])
    partial = sch.rfactor(d_inner, 3)
    i, h, j, d_outer, d_inner = sch.get_loops(partial)
    kv_head, g = sch.split(h, [None, group])
    j_tile, j_in = sch.split(j, [None, key_tile])
    sch.reorder(i, kv_head, j_tile, j_in, g, d_outer, d_inner)
    sch.parallel(sch.fuse(i, kv_head, j_tile))
    sch.vectorize(d_inner)
    sch.reverse_compute_at(dots, j_in)
    sch.decompose_reduction(partial, d_outer)
    # acc[i, h, e] = sum_j p[i, h, j] * v[j, h // group, e]: head_dim slices in parallel, each V row slice
    # serves the group's heads, vectorised over e
    acc = sch.get_sblock("acc")
    i, h, e, j = sch.get_loops(acc)
    kv_head, g = sch.split(h, [None, group])
    e_slice, e_in = sch.split(e, [None, min(value_slice, head_dim)])
    sch.reorder(i, kv_head, e_slice, j, g, e_in)
    sch.parallel(sch.fuse(i, kv_head, e_slice))
    sch.vectorize(e_in)
    sch.decompose_reduction(acc, j)
    for name in ("mx", "ex", "den", "out"):
        i, h, *_ = sch.get_loops(sch.get_sblock(name))
        sch.parallel(sch.fuse(i, h))
    return sch.mod["main"]


def _has_block(sch, name: str) -> bool:
    try:
        sch.get_sblock(name)
        return True
    except Exception:  # noqa: BLE001 - TVM raises a generic error for unknown block names
        return False


def _schedule_generic(func):
    """Parallelise the outermost loop of every top-level data-parallel block where that is legal."""
    import tvm
    from tvm import s_tir

    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except Exception:  # noqa: BLE001 - TVMScript kernels without a root block stay serial
        return func
    for block in blocks:
        try:
            loops = sch.get_loops(block)
            if loops:
                sch.parallel(loops[0])
        except Exception:  # noqa: BLE001 - reductions over the outer loop etc. are left serial
            continue
    return sch.mod["main"]


def _prefill_gemm(spec: KernelSpec) -> bool:
    """Whether a linear spec is a prefill GEMM (`cpu_gemm`) rather than a one-token GEMV."""
    return spec.op in ("linear", "linear_q") and spec.kwargs.get("rows") != 1 and cpu_gemm.supports(spec["k"])


def cpu_knob_space(spec: KernelSpec) -> dict[str, list[int]]:
    """The schedule parameters `g4c tune` searches for a kernel (first value of each: the hand schedule's):
    decode GEMVs: SIMD partial-sum width and output columns per parallel task; prefill GEMMs: the
    blocking of `cpu_gemm`; attention: keys per task (Q·K) and head_dim slice per task (P·V). Kernels
    scheduled as written have none."""
    if _prefill_gemm(spec):
        return cpu_gemm.gemm_knob_space(spec["k"])
    if spec.op in ("linear", "linear_q"):
        vectors = [v for v in (VECTOR, 8, 32, 64) if spec["k"] % v == 0]
        return {"vector": vectors, "columns": [COLUMNS_PER_TASK, 1, 2, 4, 16, 32, 64]} if vectors else {}
    if spec.op == "attention":
        slices = [v for v in (VALUE_SLICE, 16, 32, 128, 256) if v <= spec["head_dim"]] or [VALUE_SLICE]
        return {"key_tile": [KEY_TILE, 8, 16, 64, 128, 256], "value_slice": slices}
    return {}


def cpu_builders() -> dict:
    """op → TensorIR builder of the CPU kernels (GPU targets start from these too)."""
    from g4c.codegen import audio_kernels, kernels

    ops = ("embed", "embed_q", "linear", "linear_q", "rms_norm", "add_rms_norm", "head_norm_rope", "cache_write", "attention", "gelu_mul",
           "scale_rows", "add", "softcap", "ple_mix", "ple_gate", "router_input", "router_topk", "moe_experts",
           "pool_rows", "where_rows")
    audio = ("conv2d", "layer_norm", "relu", "silu", "softplus", "clamp", "clip", "glu", "depthwise_conv1d",
             "local_attention", "add_channels", "mul_channels")  # the audio tower
    # prefill's MoE: the same math as moe_experts, scheduled as grouped GEMMs (`cpu_gemm`)
    return {**{op: getattr(kernels, op) for op in ops}, **{op: getattr(audio_kernels, op) for op in audio},
            "moe_experts_grouped": kernels.moe_experts}


def schedule_cpu(spec: KernelSpec, func, knobs: dict | None = None):
    """The CPU schedule of a kernel spec (shared with the ARM targets); `knobs` (from `cpu_knob_space`,
    e.g. a tuning record) replace the hand-picked constants."""
    knobs = knobs or {}
    if _prefill_gemm(spec):  # built anew with the unscheduled kernel's parameters
        hand = {name: values[0] for name, values in cpu_gemm.gemm_knob_space(spec["k"]).items()}
        return cpu_gemm.linear_kernel(spec["k"], spec["n"], cpu_gemm.storage_of(spec), spec.name,
                                      **{**hand, **knobs})
    if spec.op == "moe_experts_grouped":  # the same parameters as its unscheduled form, moe_experts
        return cpu_gemm.moe_experts_kernel(**spec.kwargs, name=spec.name)
    if spec.op in ("linear", "linear_q"):
        return _schedule_linear(func, spec["k"], **knobs)
    if spec.op == "attention":
        return _schedule_attention(func, **knobs)
    if spec.op in ("cache_write", "router_topk", "moe_experts", "linear_qdot", "moe_experts_qdot"):  # TVMScript, scheduled as written
        return func
    return _schedule_generic(func)


class HostTarget(RelaxVMTarget):
    """`llvm`: this machine's CPU."""

    name = "llvm"

    def builders(self) -> dict:
        from g4c.codegen.int_dot import linear_qdot, moe_experts_qdot

        return {**cpu_builders(), "linear_qdot": linear_qdot, "moe_experts_qdot": moe_experts_qdot}

    def schedule(self, spec: KernelSpec, func, knobs: dict | None = None):
        return schedule_cpu(spec, func, knobs)

    def knob_space(self, spec: KernelSpec) -> dict[str, list[int]]:
        return cpu_knob_space(spec)

    def tvm_target(self):
        return host_tvm_target()

    @property
    def int8_dot(self) -> str | None:
        from tvm.target.codegen import target_has_features

        from g4c.codegen.int_dot import REQUIRED_FEATURES

        return "x86 AVX-512 VNNI" if target_has_features(list(REQUIRED_FEATURES), host_tvm_target()) else None

    def requirements(self) -> Requirements:
        return Requirements(machines=(platform.machine().lower(),))

    @property
    def runs_here(self) -> bool:
        return True

    def bundled_libraries(self) -> list[str]:
        return list(self.requirements().runtime_libraries)

    def embed_toolchain(self) -> Toolchain:
        return vm_toolchain("g++", host_runtime_libraries(self.requirements().runtime_libraries))


KIND = TargetKind("llvm", lambda profile: HostTarget(), "this CPU", order=0, host=True)
