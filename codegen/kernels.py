"""TensorIR kernels for the fused g4c ops, written with TVM's tensor expression language (TE).

Each function returns a `tirx.PrimFunc` for one static configuration (widths, heads, head_dim, eps,
RoPE, window...) with a symbolic token count T (and symbolic cache length S), so one build serves
every prompt length. Kernels are destination-passing: the last parameters are outputs, except
`cache_write`, which updates the cache buffer in place. All arithmetic is fp32. The math these
kernels share with the GPU kernels (RoPE, ring slots and masks, the router...) lives in
`g4c.codegen.kernel_math`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

from tvm import te, tirx
from tvm.script import tirx as T_

from g4c.codegen.kernel_math import (F32, MASKED_SCORE, STORAGE, causal_window_visible, dequant, gelu_tanh,
                                     inv_rms, load_weight, param, quant_data_dtype, quant_scale_dtype, quant_shapes, ring_key_position,
                                     ring_slot, rope_rotate, rope_rotate_axes, route_top_k, weight_at, weight_param)

I64 = "int64"


_INDEX = contextvars.ContextVar("g4c_index_dtype", default=I64)


@contextlib.contextmanager
def index_dtype(dtype: str):
    """Build kernels with `dtype` token counts, ids and positions (GPU targets: int32, as WGSL has no
    64-bit integers and 32-bit index math is cheaper on every GPU)."""
    token = _INDEX.set(dtype)
    try:
        yield
    finally:
        _INDEX.reset(token)


def _t() -> tirx.Var:
    return tirx.Var("T", _INDEX.get())


def _prim(args, name: str) -> tirx.PrimFunc:
    return te.create_prim_func(args).with_attr("global_symbol", name)


def embed(vocab: int, hidden: int, name: str, dtype: str = "float32") -> tirx.PrimFunc:
    """out[i] = table[ids[i]] as fp32 (Gemma's √hidden embedding scale is applied by a later op)."""
    t = _t()
    table = te.placeholder((vocab, hidden), STORAGE[dtype], name="table")
    ids = te.placeholder((t,), _INDEX.get(), name="ids")
    out = te.compute((t, hidden), lambda i, j: load_weight(table[ids[i], j], dtype), name="out")
    return _prim([table, ids, out], name)


def linear(k: int, n: int, name: str, dtype: str = "float32", rows: int | None = None) -> tirx.PrimFunc:
    """y = x @ wᵀ with fp32 accumulation; w stored in `dtype`; `rows` fixes the token count (a GPU
    decode step's GEMV: dlight schedules a symbolic-row kernel as a GEMM, tiles of 32 rows for one)."""
    t = rows or _t()
    x = te.placeholder((t, k), F32, name="x")
    w = te.placeholder((n, k), STORAGE[dtype], name="w")
    r = te.reduce_axis((0, k), name="k")
    y = te.compute((t, n), lambda i, j: te.sum(x[i, r] * load_weight(w[j, r], dtype), axis=r), name="y")
    return _prim([x, w, y], name)


def _quantized(rows: int, k: int, scheme: str) -> tuple:
    """Placeholders of a group-quantized [rows, k] weight (`g4c.quant` layout)."""
    data_shape, scales_shape = quant_shapes((rows, k), scheme)
    return (te.placeholder(data_shape, quant_data_dtype(), name="w_data"),
            te.placeholder(scales_shape, quant_scale_dtype(), name="w_scales"))


def linear_q(k: int, n: int, scheme: str, name: str, rows: int | None = None) -> tirx.PrimFunc:
    """`linear` with a group-quantized weight: each weight is dequantized where the reduction reads
    it (no dequantized copy exists); fp32 accumulation."""
    t = rows or _t()
    x = te.placeholder((t, k), F32, name="x")
    data, scales = _quantized(n, k, scheme)
    # a separate decode stage that every schedule inlines into the reduction (the GPU GEMV/GEMM rules
    # recognise the pattern this way; it is never materialised)
    w = te.compute((n, k), lambda j, c: dequant(data, scales, j, c, scheme), name="w_deq")
    r = te.reduce_axis((0, k), name="k")
    y = te.compute((t, n), lambda i, j: te.sum(x[i, r] * w[j, r], axis=r), name="y")
    return _prim([x, data, scales, y], name)


def embed_q(vocab: int, hidden: int, scheme: str, name: str) -> tirx.PrimFunc:
    """`embed` of a group-quantized table: only the gathered rows are dequantized."""
    t = _t()
    data, scales = _quantized(vocab, hidden, scheme)
    ids = te.placeholder((t,), _INDEX.get(), name="ids")
    out = te.compute((t, hidden), lambda i, j: dequant(data, scales, ids[i], j, scheme), name="out")
    return _prim([data, scales, ids, out], name)


def _rms(x, rows_shape, dim: int, eps: float, index):
    """(mean(x²) + eps)^-0.5 per row, as a TE tensor over `rows_shape`."""
    r = te.reduce_axis((0, dim), name="d")
    sq = te.compute(rows_shape, lambda *i: te.sum(index(x, i, r) * index(x, i, r), axis=r), name="sq")
    return te.compute(rows_shape, lambda *i: inv_rms(sq[i], dim, eps), name="inv_rms")


def rms_norm(dim: int, eps: float, weighted: bool, name: str) -> tirx.PrimFunc:
    t = _t()
    x = te.placeholder((t, dim), F32, name="x")
    inv = _rms(x, (t,), dim, eps, lambda a, i, r: a[i[0], r])
    if weighted:
        w = te.placeholder((dim,), F32, name="w")
        out = te.compute((t, dim), lambda i, j: x[i, j] * inv[i] * w[j], name="out")
        return _prim([x, w, out], name)
    out = te.compute((t, dim), lambda i, j: x[i, j] * inv[i], name="out")
    return _prim([x, out], name)


def add_rms_norm(dim: int, eps: float, name: str) -> tirx.PrimFunc:
    t = _t()
    res = te.placeholder((t, dim), F32, name="residual")
    y = te.placeholder((t, dim), F32, name="y")
    w = te.placeholder((dim,), F32, name="w")
    inv = _rms(y, (t,), dim, eps, lambda a, i, r: a[i[0], r])
    out = te.compute((t, dim), lambda i, j: res[i, j] + y[i, j] * inv[i] * w[j], name="out")
    return _prim([res, y, w, out], name)


def head_norm_rope(total: int, offset: int, heads: int, head_dim: int, eps: float, weighted: bool, rope: bool,
                   name: str, axes: int = 1) -> tirx.PrimFunc:
    """Heads [offset, offset+heads) of a fused projection [T, total], RMS-normalised per head, then
    rotated (rotate_half RoPE with per-pair inverse frequencies `inv_freq`). `axes` 2: axial RoPE
    (`kernel_math.rope_rotate_axes`) at positions [T, 2]."""
    t = _t()
    src = te.placeholder((t, total), F32, name="src")
    pos = te.placeholder((t,) if axes == 1 else (t, axes), I64, name="positions")
    half = head_dim // 2 // axes

    def at(i, h, d):
        return src[i, (offset + h) * head_dim + d]

    inv = _rms(src, (t, heads), head_dim, eps, lambda a, i, r: at(i[0], i[1], r))
    args = [src, pos]
    if weighted:
        w = te.placeholder((head_dim,), F32, name="w")
        args.append(w)
        normed = te.compute((t, heads, head_dim), lambda i, h, d: at(i, h, d) * inv[i, h] * w[d], name="normed")
    else:
        normed = te.compute((t, heads, head_dim), lambda i, h, d: at(i, h, d) * inv[i, h], name="normed")
    if not rope:
        out = te.compute((t, heads, head_dim), lambda i, h, d: normed[i, h, d], name="out")
        return _prim(args + [out], name)
    inv_freq = te.placeholder((half,), F32, name="inv_freq")
    args.append(inv_freq)
    out = te.compute((t, heads, head_dim), lambda i, h, d: rope_rotate_axes(
        lambda e: normed[i, h, e], lambda a: pos[i] if axes == 1 else pos[i, a], inv_freq, d, head_dim, axes),
        name="out")
    return _prim(args + [out], name)


def cache_write(kv_heads: int, head_dim: int, name: str) -> tirx.PrimFunc:
    """cache[p mod R] = new[i] for each new token i at position p. A ring buffer of R slots keeps the
    newest positions; a full cache has R > every position, so the same index is just p."""
    @T_.prim_func
    def func(cache_h: T_.handle, new_h: T_.handle, pos_h: T_.handle):
        T_.func_attr({"global_symbol": name, "tirx.noalias": True})
        r = T_.int64()
        t = T_.int64()
        cache = T_.match_buffer(cache_h, (r, kv_heads, head_dim), F32)
        new = T_.match_buffer(new_h, (t, kv_heads, head_dim), F32)
        pos = T_.match_buffer(pos_h, (t,), I64)
        for i, h, d in T_.grid(t, kv_heads, head_dim):
            cache[ring_slot(pos[i], r), h, d] = new[i, h, d]
    return func


def attention(q_heads: int, kv_heads: int, head_dim: int, window: int | None, name: str,
              k_from_v: bool = False, reach: bool = False) -> tirx.PrimFunc:
    """Causal GQA attention of T queries over a cache view of S slots, unscaled (Gemma 4's q·k scaling
    is 1.0). The cache holds positions `0 .. L-1` (L = positions[T-1] + 1) either directly (full:
    slot = position, S = L) or as a ring of S slots (slot s holds the newest position p ≤ L-1 with
    p ≡ s mod S); one formula (`kernel_math.ring_key_position`) covers both.

    `reach` adds an input reach [T] after the positions: query i sees keys up to position reach[i]
    instead of its own (a media prompt's image blocks; an encoder, whose queries reach every key).

    `k_from_v` (k_eq_v global layers): only V is cached and K is rebuilt as rope(V * k_norm) at each
    key's position — exact, since both come from the same normalised raw projection."""
    t, s = _t(), tirx.Var("S", I64)
    q = te.placeholder((t, q_heads, head_dim), F32, name="q")
    vc = te.placeholder((s, kv_heads, head_dim), F32, name="v_cache")
    pos = te.placeholder((t,), I64, name="positions")
    group = q_heads // kv_heads
    last = pos[t - 1]

    def key_pos(j):
        return ring_key_position(j, last, s)

    if k_from_v:
        k_norm = te.placeholder((head_dim,), F32, name="k_norm")
        inv_freq = te.placeholder((head_dim // 2,), F32, name="inv_freq")
        scaled = te.compute((s, kv_heads, head_dim), lambda j, h, e: vc[j, h, e] * k_norm[e], name="k_unrotated")
        kc = te.compute((s, kv_heads, head_dim), lambda j, h, e: rope_rotate(
            lambda x: scaled[j, h, x], key_pos(j), inv_freq, e, head_dim), name="k_cache")
        inputs = [q, vc, pos, k_norm, inv_freq]
    else:
        kc = te.placeholder((s, kv_heads, head_dim), F32, name="k_cache")
        inputs = [q, kc, vc, pos]
    limit = pos
    if reach:
        limit = te.placeholder((t,), I64, name="reach")
        inputs.insert(inputs.index(pos) + 1, limit)

    def visible(i, j):
        return causal_window_visible(j, key_pos(j), pos[i], last, window, limit[i])

    d = te.reduce_axis((0, head_dim), name="d")
    neg = tirx.const(MASKED_SCORE, F32)
    dots = te.compute((t, q_heads, s), lambda i, h, j: te.sum(q[i, h, d] * kc[j, h // group, d], axis=d),
                      name="dots")
    scores = te.compute((t, q_heads, s), lambda i, h, j: tirx.if_then_else(
        visible(i, j), dots[i, h, j], neg), name="scores")
    j1 = te.reduce_axis((0, s), name="j1")
    mx = te.compute((t, q_heads), lambda i, h: te.max(scores[i, h, j1], axis=j1), name="mx")
    ex = te.compute((t, q_heads, s), lambda i, h, j: tirx.if_then_else(
        visible(i, j), tirx.exp(scores[i, h, j] - mx[i, h]), tirx.const(0.0, F32)), name="ex")
    j2 = te.reduce_axis((0, s), name="j2")
    den = te.compute((t, q_heads), lambda i, h: te.sum(ex[i, h, j2], axis=j2), name="den")
    j3 = te.reduce_axis((0, s), name="j3")
    acc = te.compute((t, q_heads, head_dim), lambda i, h, e: te.sum(ex[i, h, j3] * vc[j3, h // group, e], axis=j3),
                     name="acc")
    out = te.compute((t, q_heads, head_dim), lambda i, h, e: acc[i, h, e] / den[i, h], name="out")
    return _prim(inputs + [out], name)


def take_last(count: int, trailing: tuple[int, ...], dtype: str, name: str) -> tirx.PrimFunc:
    """The last `count` rows of x [T, *trailing] (the KV-shared tail and the LM head keep only the
    positions whose logits are requested)."""
    t = _t()
    x = te.placeholder((t, *trailing), dtype, name="x")
    out = te.compute((count, *trailing), lambda i, *rest: x[(t - count + i, *rest)], name="out")
    return _prim([x, out], name)


def pool_rows(dim: int, k: int, name: str) -> tirx.PrimFunc:
    """out[s] = mean of the k rows x[index[s, :]] (the vision pooler: each soft token averages its k×k
    patches; S symbolic)."""
    t, s = _t(), tirx.Var("S", _INDEX.get())
    x = te.placeholder((t, dim), F32, name="x")
    index = te.placeholder((s, k), _INDEX.get(), name="index")
    j = te.reduce_axis((0, k), name="j")
    total = te.compute((s, dim), lambda r, d: te.sum(x[index[r, j], d], axis=j), name="total")
    out = te.compute((s, dim), lambda r, d: total[r, d] / tirx.const(k, F32), name="out")
    return _prim([x, index, out], name)


def where_rows(dim: int, name: str) -> tirx.PrimFunc:
    """out[t] = a[t] where mask[t] ≠ 0, else b[t] (a media prompt's soft tokens over its embedded ids)."""
    t = _t()
    mask = te.placeholder((t,), _INDEX.get(), name="mask")
    a = te.placeholder((t, dim), F32, name="a")
    b = te.placeholder((t, dim), F32, name="b")
    out = te.compute((t, dim), lambda i, j: tirx.if_then_else(mask[i] != 0, a[i, j], b[i, j]), name="out")
    return _prim([mask, a, b, out], name)


def gelu_mul(inter: int, name: str) -> tirx.PrimFunc:
    """gelu_tanh(h[:, :I]) * h[:, I:] for a fused gate/up projection h [T, 2I]."""
    t = _t()
    h = te.placeholder((t, 2 * inter), F32, name="h")
    out = te.compute((t, inter), lambda i, j: gelu_tanh(h[i, j]) * h[i, j + inter], name="out")
    return _prim([h, out], name)


def scale_rows(dim: int, name: str) -> tirx.PrimFunc:
    """x * s for a 1-element tensor s (layer_scalar)."""
    t = _t()
    x = te.placeholder((t, dim), F32, name="x")
    s = te.placeholder((1,), F32, name="s")
    out = te.compute((t, dim), lambda i, j: x[i, j] * s[0], name="out")
    return _prim([x, s, out], name)


def add(dim: int, name: str) -> tirx.PrimFunc:
    t = _t()
    a = te.placeholder((t, dim), F32, name="a")
    b = te.placeholder((t, dim), F32, name="b")
    out = te.compute((t, dim), lambda i, j: a[i, j] + b[i, j], name="out")
    return _prim([a, b, out], name)


def softcap(dim: int, cap: float, name: str) -> tirx.PrimFunc:
    t = _t()
    x = te.placeholder((t, dim), F32, name="x")
    c = tirx.const(cap, F32)
    out = te.compute((t, dim), lambda i, j: c * tirx.tanh(x[i, j] / c), name="out")
    return _prim([x, out], name)


def ple_mix(layers: int, dim: int, eps: float, table_scale: float, proj_scale: float, mix_scale: float,
            name: str) -> tirx.PrimFunc:
    """((rms_norm(proj * proj_scale) per layer slice, norm) + rows * table_scale) * mix_scale → [T, L*P]."""
    t = _t()
    rows = te.placeholder((t, layers * dim), F32, name="rows")
    proj = te.placeholder((t, layers * dim), F32, name="proj")
    w = te.placeholder((dim,), F32, name="w")
    ps = tirx.const(proj_scale, F32)
    scaled = te.compute((t, layers * dim), lambda i, j: proj[i, j] * ps, name="scaled")
    inv = _rms(scaled, (t, layers), dim, eps, lambda a, i, r: a[i[0], i[1] * dim + r])
    out = te.compute((t, layers * dim), lambda i, j: (
        scaled[i, j] * inv[i, j // dim] * w[j % dim] + rows[i, j] * tirx.const(table_scale, F32))
        * tirx.const(mix_scale, F32), name="out")
    return _prim([rows, proj, w, out], name)


def ple_gate(layers: int, dim: int, index: int, name: str) -> tirx.PrimFunc:
    """gelu_tanh(g) * ple[:, index] for g [T, P] and ple [T, L*P]."""
    t = _t()
    g = te.placeholder((t, dim), F32, name="g")
    ple = te.placeholder((t, layers * dim), F32, name="ple")
    out = te.compute((t, dim), lambda i, j: gelu_tanh(g[i, j]) * ple[i, index * dim + j], name="out")
    return _prim([g, ple, out], name)


def router_input(dim: int, eps: float, input_scale: float, name: str) -> tirx.PrimFunc:
    """rms_norm(r) (no weight) * router.scale * input_scale."""
    t = _t()
    r = te.placeholder((t, dim), F32, name="r")
    s = te.placeholder((dim,), F32, name="scale")
    inv = _rms(r, (t,), dim, eps, lambda a, i, k: a[i[0], k])
    out = te.compute((t, dim), lambda i, j: r[i, j] * inv[i] * s[j] * tirx.const(input_scale, F32), name="out")
    return _prim([r, s, out], name)


def router_topk(experts: int, top_k: int, name: str) -> tirx.PrimFunc:
    """softmax over experts, the top-k (first index wins ties), renormalised, times per_expert_scale
    (`kernel_math.route_top_k`), token by token."""
    @T_.prim_func
    def func(logits_h: T_.handle, pes_h: T_.handle, idx_h: T_.handle, w_h: T_.handle):
        T_.func_attr({"global_symbol": name, "tirx.noalias": True})
        t = T_.int64()
        logits = T_.match_buffer(logits_h, (t, experts), F32)
        pes = T_.match_buffer(pes_h, (experts,), F32)
        idx = T_.match_buffer(idx_h, (t, top_k), I64)
        w = T_.match_buffer(w_h, (t, top_k), F32)
        probs = T_.alloc_buffer((experts,), F32)
        acc = T_.alloc_buffer((3,), F32)
        best = T_.alloc_buffer((1,), I64)
        for i in range(t):
            route_top_k(logits, pes, idx, w, i, probs, acc, best, experts, top_k)
    return func


def moe_experts(hidden: int, inter: int, experts: int, top_k: int, name: str, gate_up_storage: str = "float32",
                down_storage: str = "float32") -> tirx.PrimFunc:
    """Σ_j w[t,j] · down[e](gelu(gate)·up)(x[t]) with e = idx[t, j], grouped by expert.

    Tasks are (block of expert rows, expert) pairs: a task loads its rows of one expert once and
    applies them to every (token, slot) routed to that expert, so a prefill reads each selected
    expert once instead of once per token, and decode touches only the top-k experts. Row blocks are the outer task index, so the
    threads split every expert's rows evenly whichever experts are selected. Dot products run as
    SIMD-width partial sums. Each (token, slot) has exactly one expert, so tasks never write the
    same element.

    The expert banks gate_up [E, 2I, H] and down [E, H, I] are stored as `gate_up_storage` /
    `down_storage`: a float dtype, or a quantization (q8/q4: each bank is its data and scales
    parameters, dequantized where the dot products read it, `kernel_math.weight_at`)."""
    lanes_h, lanes_i = math.gcd(16, hidden), math.gcd(16, inter)  # SIMD partial sums over hidden / inter
    rows_i, rows_h = math.gcd(16, inter), math.gcd(16, hidden)  # expert rows per task

    @T_.macro
    def body(x, idx, w, gate_up, down, out, t):
        act = T_.alloc_buffer((t, top_k, inter), F32)
        part = T_.alloc_buffer((t, top_k, hidden), F32)
        for task in T_.parallel((inter // rows_i) * experts):
            acc = T_.decl_buffer((2 * lanes_h,), F32, scope="local")
            e = task % experts
            for i in range(t):
                for j in range(top_k):
                    if idx[i, j] == T_.Cast(I64, e):
                        for r in range(rows_i):
                            c = task // experts * rows_i + r
                            for lane in T_.vectorized(2 * lanes_h):
                                acc[lane] = T_.float32(0)
                            for k in range(hidden // lanes_h):
                                for lane in T_.vectorized(lanes_h):
                                    acc[lane] = acc[lane] + x[i, k * lanes_h + lane] * weight_at(
                                        gate_up, (e, c), k * lanes_h + lane, gate_up_storage)
                                    acc[lanes_h + lane] = acc[lanes_h + lane] + x[i, k * lanes_h + lane] * weight_at(
                                        gate_up, (e, inter + c), k * lanes_h + lane, gate_up_storage)
                            for lane in range(1, lanes_h):
                                acc[0] = acc[0] + acc[lane]
                                acc[lanes_h] = acc[lanes_h] + acc[lanes_h + lane]
                            act[i, j, c] = gelu_tanh(acc[0]) * acc[lanes_h] * w[i, j]
        for task in T_.parallel((hidden // rows_h) * experts):
            acc2 = T_.decl_buffer((lanes_i,), F32, scope="local")
            e = task % experts
            for i in range(t):
                for j in range(top_k):
                    if idx[i, j] == T_.Cast(I64, e):
                        for r in range(rows_h):
                            o = task // experts * rows_h + r
                            for lane in T_.vectorized(lanes_i):
                                acc2[lane] = T_.float32(0)
                            for k in range(inter // lanes_i):
                                for lane in T_.vectorized(lanes_i):
                                    acc2[lane] = acc2[lane] + act[i, j, k * lanes_i + lane] * weight_at(
                                        down, (e, o), k * lanes_i + lane, down_storage)
                            for lane in range(1, lanes_i):
                                acc2[0] = acc2[0] + acc2[lane]
                            part[i, j, o] = acc2[0]
        for i in T_.parallel(t):
            for o in range(hidden):
                out[i, o] = part[i, 0, o]
                for j in range(1, top_k):
                    out[i, o] = out[i, o] + part[i, j, o]

    @T_.prim_func
    def func():
        T_.func_attr({"global_symbol": name, "tirx.noalias": True})
        t = T_.int64()
        x = param("x", (t, hidden), F32)
        idx = param("idx", (t, top_k), I64)
        w = param("w", (t, top_k), F32)
        gate_up = weight_param("gate_up", (experts, 2 * inter, hidden), gate_up_storage)
        down = weight_param("down", (experts, hidden, inter), down_storage)
        out = param("out", (t, hidden), F32)
        body(x, idx, w, gate_up, down, out, t)
    return func
