"""The x86/host `llvm` target: TVM's LLVM codegen for this CPU, with CPU schedules.

GEMMs/GEMVs (`linear_*`) are the decode cost: their schedule splits the reduction into SIMD-width
chunks kept as partial sums (rfactor), parallelises over output columns and vectorises the partial
sums, so each thread streams contiguous weight rows. Attention is the prefill cost: Q·K runs as the
same SIMD partial-sum dot products per (query, head), P·V streams V rows with the head_dim
vectorised (11× faster in decode and 14× in a 64-token prefill than the naive loop order, measured on
an E2B sliding layer). Other kernels are parallelised over their outermost data-parallel loop.
"""

from __future__ import annotations

import os

from g4c.targets.base import Target

VECTOR = 16
COLUMNS_PER_TASK = 8


def _cpu_name() -> str:
    import tvm

    get = getattr(tvm.target.codegen, "llvm_get_system_cpu", None)
    return get() if get else "x86-64"


def _tvm_target():
    import tvm

    return tvm.target.Target({"kind": "llvm", "mcpu": os.environ.get("G4C_MCPU", _cpu_name()),
                              "num-cores": os.cpu_count() or 1})


def _schedule_linear(func, reduction: int):
    import tvm
    from tvm import s_tir

    if reduction % VECTOR:
        return func
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    block = sch.get_sblock("y")
    i, j, k = sch.get_loops(block)
    ko, ki = sch.split(k, [None, VECTOR])
    rf = sch.rfactor(ki, 2)
    ri, rj, rko, rki = sch.get_loops(rf)
    rjo, rji = sch.split(rj, [None, COLUMNS_PER_TASK])
    sch.reorder(rjo, ri, rko, rji, rki)
    sch.parallel(rjo)
    sch.vectorize(rki)
    sch.reverse_compute_at(block, ri)
    sch.decompose_reduction(rf, rko)
    return sch.mod["main"]


def _schedule_attention(func):
    """codegen.kernels.attention: blocks dots, scores, mx, ex, den, acc, out (+ k_unrotated, k_cache
    when K is rebuilt from V)."""
    import tvm
    from tvm import s_tir

    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    sch.compute_inline(sch.get_sblock("scores"))  # mask + scale: cheaper to recompute than to store
    if _has_block(sch, "k_cache"):
        sch.compute_inline(sch.get_sblock("k_unrotated"))
        sch.parallel(sch.get_loops(sch.get_sblock("k_cache"))[0])
    # dots[i, h, j] = q[i, h, :] . k[j, h // group, :] as SIMD-width partial sums over head_dim
    dots = sch.get_sblock("dots")
    *_, d = sch.get_loops(dots)
    _, d_inner = sch.split(d, [None, VECTOR])
    partial = sch.rfactor(d_inner, 3)
    i, h, j, d_outer, d_inner = sch.get_loops(partial)
    sch.parallel(sch.fuse(i, h))
    sch.vectorize(d_inner)
    sch.reverse_compute_at(dots, j)
    sch.decompose_reduction(partial, d_outer)
    # acc[i, h, e] = sum_j p[i, h, j] * v[j, h // group, e]: stream V rows, vectorise over e
    acc = sch.get_sblock("acc")
    i, h, e, j = sch.get_loops(acc)
    sch.reorder(i, h, j, e)
    sch.parallel(sch.fuse(i, h))
    sch.vectorize(e)
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


def schedule(name: str, func):
    if name.startswith("linear_"):  # linear_{K}x{N}
        return _schedule_linear(func, int(name.split("_")[1].split("x")[0]))
    if name.startswith("attention_"):
        return _schedule_attention(func)
    if name.startswith(("cache_write", "router_topk")):
        return func
    return _schedule_generic(func)


def host_target() -> Target:
    return Target("llvm", _tvm_target, schedule)
