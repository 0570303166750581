"""GPU implementations of the fused ops whose CPU kernels (`g4c.codegen.kernels`) do not map onto
GPU threads: attention, per-head norm + RoPE, cache writes, MoE routing and experts.

These are written for GPUs directly (TensorIR with thread bindings, shared memory and barriers),
share their math with the CPU kernels (`g4c.codegen.kernel_math`), and are used by every GPU target
(WebGPU/Vulkan, CUDA, Metal): one source of truth per kernel. All indices are int32 (WGSL has no
64-bit integers), arithmetic is fp32. The other ops (linear, norms, elementwise) are TE kernels
scheduled by dlight.

Each kernel is marked `tirx.is_scheduled`, so dlight leaves it as written.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from g4c.codegen.kernel_math import (F32, MASKED_SCORE, causal_window_visible, gelu_tanh, inv_rms,
                                     online_softmax_update, param, ring_key_position, ring_slot, rope_rotate, rope_rotate_axes,
                                     route_top_k, unmasked, weight_at, weight_param)

I32 = "int32"
THREADS = 64  # threads per workgroup for row-wise kernels


def _attrs(name: str) -> dict:
    return {"global_symbol": name, "tirx.noalias": True, "tirx.is_scheduled": True}


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def attention_parts(window: int | None) -> int:
    """Key-range partitions (split-K) of a GPU attention: a decode step has only q_heads queries, so a
    long global cache is cut into 16 ranges scanned side by side; a sliding ring (window + chunk
    slots) into 4."""
    return 4 if window else 16


def _key_reader(head_dim: int, k_from_v: bool):
    """key(k, v, k_norm, freq, slot, kv_head, key_position, d): K from its cache, or for k_eq_v layers
    (plan_kv_cache stores V only) rebuilt as rope(V * k_norm) at the key's position."""

    def key_plain(k, v, kn, freq, j, kvh, kp, d):
        return k[j, kvh, d]

    def key_rebuilt(k, v, kn, freq, j, kvh, kp, d):
        return rope_rotate(lambda e: v[j, kvh, e] * kn[e], kp, freq, d, head_dim)

    return key_rebuilt if k_from_v else key_plain


def _attention_func(body, attrs: dict, q_heads: int, kv_heads: int, head_dim: int, parts: int,
                    k_from_v: bool, reach: bool = False) -> tirx.PrimFunc:
    """The PrimFunc around an attention `body` macro: (q, k, v, positions, out), with `reach` (q, k, v,
    positions, reach, out), or for k_eq_v layers (q, v, positions, k_norm, rope freq, out); out is
    [T, heads, parts, head_dim + 2]. The body's reach is the positions when there is none (causal)."""
    half = head_dim // 2
    if k_from_v and reach:
        raise ValueError("attention with a reach input reads K from its cache (no k_eq_v sliding layers)")
    if k_from_v:
        @T.prim_func
        def func(q_h: T.handle, v_h: T.handle, pos_h: T.handle, kn_h: T.handle, f_h: T.handle, out_h: T.handle):
            T.func_attr(attrs)
            t, s = T.int32(), T.int32()
            q = T.match_buffer(q_h, (t, q_heads, head_dim), F32)
            v = T.match_buffer(v_h, (s, kv_heads, head_dim), F32)
            pos = T.match_buffer(pos_h, (t,), I32)
            kn = T.match_buffer(kn_h, (head_dim,), F32)
            freq = T.match_buffer(f_h, (half,), F32)
            out = T.match_buffer(out_h, (t, q_heads, parts, head_dim + 2), F32)
            body(q, v, v, pos, pos, kn, freq, out, t, s)
        return func

    @T.prim_func
    def func_plain(q_h: T.handle, k_h: T.handle, v_h: T.handle, pos_h: T.handle, out_h: T.handle):
        T.func_attr(attrs)
        t, s = T.int32(), T.int32()
        q = T.match_buffer(q_h, (t, q_heads, head_dim), F32)
        k = T.match_buffer(k_h, (s, kv_heads, head_dim), F32)
        v = T.match_buffer(v_h, (s, kv_heads, head_dim), F32)
        pos = T.match_buffer(pos_h, (t,), I32)
        out = T.match_buffer(out_h, (t, q_heads, parts, head_dim + 2), F32)
        body(q, k, v, pos, pos, q, q, out, t, s)

    @T.prim_func
    def func_reach(q_h: T.handle, k_h: T.handle, v_h: T.handle, pos_h: T.handle, r_h: T.handle, out_h: T.handle):
        T.func_attr(attrs)
        t, s = T.int32(), T.int32()
        q = T.match_buffer(q_h, (t, q_heads, head_dim), F32)
        k = T.match_buffer(k_h, (s, kv_heads, head_dim), F32)
        v = T.match_buffer(v_h, (s, kv_heads, head_dim), F32)
        pos = T.match_buffer(pos_h, (t,), I32)
        rch = T.match_buffer(r_h, (t,), I32)
        out = T.match_buffer(out_h, (t, q_heads, parts, head_dim + 2), F32)
        body(q, k, v, pos, rch, q, q, out, t, s)
    return func_reach if reach else func_plain


def attention(q_heads: int, kv_heads: int, head_dim: int, window: int | None, name: str,
              k_from_v: bool = False, reach: bool = False) -> tirx.PrimFunc:
    """Causal GQA attention (same contract as `kernels.attention`, except the output) over one of
    `attention_parts(window)` key ranges per workgroup: workgroup (query, head, range) streams its keys
    in chunks of THREADS (one key's score per thread, in shared memory) with an online softmax
    (`kernel_math.online_softmax_update`), each thread accumulating its slice of head_dim, so no
    [T, heads, S] intermediate exists and any cache length S fits. It writes the unnormalised sum, the
    running max and the softmax denominator [T, heads, parts, head_dim + 2]; `attention_merge`
    combines the ranges. Sliding layers pass their ring of window slots, so they read only the
    window; a full cache may be passed whole (its slots past the last position are never read),
    which keeps a decode step's shapes static."""
    group, per, nt = q_heads // kv_heads, _ceil(head_dim, THREADS), THREADS
    parts = attention_parts(window)

    attrs = _attrs(name)
    key_at = _key_reader(head_dim, k_from_v)

    @T.macro
    def body(q, k, v, pos, rch, kn, freq, out, t, s):
        for blk in T.thread_binding(t * q_heads * parts, thread="blockIdx.x"):
            for tid in T.thread_binding(nt, thread="threadIdx.x"):
                sc = T.alloc_buffer((1, nt), F32, scope="shared")
                acc = T.alloc_buffer((per,), F32, scope="local")
                run = T.alloc_buffer((4,), F32, scope="local")  # online softmax state
                dot = T.alloc_buffer((2,), F32, scope="local")  # dot product, score
                i = blk // (q_heads * parts)
                h = blk // parts % q_heads
                p = blk % parts
                last = pos[t - 1]
                chunk = T.ceildiv(T.min(last + 1, s), parts)  # only the slots written so far
                run[0] = T.float32(MASKED_SCORE)
                run[1] = T.float32(0)
                for r in range(per):
                    acc[r] = T.float32(0)
                for c in range(T.ceildiv(chunk, nt)):
                    j = p * chunk + c * nt + tid
                    kp = ring_key_position(j, last, s)
                    dot[1] = T.float32(MASKED_SCORE)
                    if j < s and j < (p + 1) * chunk and causal_window_visible(j, kp, pos[i], last, window, rch[i]):
                        dot[1] = T.float32(0)
                        for d in range(head_dim):
                            dot[1] = dot[1] + q[i, h, d] * key_at(k, v, kn, freq, j, h // group, kp, d)
                    sc[0, tid] = dot[1]
                    online_softmax_update(run, sc, 0, nt)
                    for r in range(per):
                        acc[r] = acc[r] * run[3]
                    for u in range(nt):
                        dot[1] = sc[0, u]  # a shared load may not sit in a branch condition
                        if unmasked(dot[1]):
                            dot[0] = T.exp(dot[1] - run[0])
                            run[1] = run[1] + dot[0]
                            for r in range(per):
                                if r * nt + tid < head_dim:
                                    acc[r] = acc[r] + dot[0] * v[p * chunk + c * nt + u, h // group,
                                                                 r * nt + tid]
                for r in range(per):
                    if r * nt + tid < head_dim:
                        out[i, h, p, r * nt + tid] = acc[r]
                if tid == 0:
                    out[i, h, p, head_dim] = run[0]
                    out[i, h, p, head_dim + 1] = run[1]

    return _attention_func(body, attrs, q_heads, kv_heads, head_dim, parts, k_from_v, reach)


PREFILL_TILE_ROWS = 16  # (query, head) rows of one prefill attention workgroup: 16 rows share each K/V load
PREFILL_TILE_THREADS = 128


def prefill_chunk_keys(head_dim: int, shared_bytes: int) -> int:
    """Keys per shared-memory chunk of `prefill_attention`: a power of two whose K and V rows plus the
    score tile fit `shared_bytes` (WebGPU's default 16 KiB, 48 KiB on CUDA), at most 32."""
    per_key = 2 * head_dim * 4 + 2 * PREFILL_TILE_ROWS * 4  # K, V rows; scores, probabilities
    keys = max(1, min(32, (shared_bytes - PREFILL_TILE_ROWS * 4) // per_key))
    return 1 << (keys.bit_length() - 1)


def prefill_attention(q_heads: int, kv_heads: int, head_dim: int, window: int | None, name: str,
                      k_from_v: bool = False, shared_bytes: int = 16384, reach: bool = False) -> tirx.PrimFunc:
    """`attention` for prefill, tiled over queries: a workgroup takes PREFILL_TILE_ROWS (query, head)
    rows that share one KV head (the GQA group of a few consecutive queries) and one key range; per
    chunk of keys it loads K and V into shared memory once for all its rows (the untiled kernel
    reloads them per query and head), computes the rows × keys scores, updates each row's online
    softmax (max, denominator, rescale factor) and accumulates P·V, every thread owning a slice of
    the rows × head_dim accumulator. Same masks (causal, window, ring slots), same output as
    `attention`: [T, heads, parts, head_dim + 2] partial results for `attention_merge`."""
    group, nt, rows = q_heads // kv_heads, PREFILL_TILE_THREADS, PREFILL_TILE_ROWS
    parts = attention_parts(window)
    keys = prefill_chunk_keys(head_dim, shared_bytes)
    per_acc = _ceil(rows * head_dim, nt)
    attrs = _attrs(name)
    key_at = _key_reader(head_dim, k_from_v)

    @T.macro
    def body(q, k, v, pos, rch, kn, freq, out, t, s):
        for blk in T.thread_binding(T.ceildiv(t * group, rows) * kv_heads * parts, thread="blockIdx.x"):
            for tid in T.thread_binding(nt, thread="threadIdx.x"):
                ks = T.alloc_buffer((keys, head_dim), F32, scope="shared")
                vs = T.alloc_buffer((keys, head_dim), F32, scope="shared")
                sc = T.alloc_buffer((rows, keys), F32, scope="shared")  # scores
                pr = T.alloc_buffer((rows, keys), F32, scope="shared")  # probabilities
                rescale = T.alloc_buffer((rows,), F32, scope="shared")
                acc = T.alloc_buffer((per_acc,), F32, scope="local")
                tmp = T.alloc_buffer((2,), F32, scope="local")
                row = T.alloc_buffer((4,), F32, scope="local")  # thread r < rows: row r's online softmax state
                tile = blk // (kv_heads * parts)
                kvh = blk // parts % kv_heads
                p = blk % parts
                last = pos[t - 1]
                n = T.min(last + 1, s)  # slots written so far
                chunk = T.ceildiv(n, parts)
                for e in range(per_acc):
                    acc[e] = T.float32(0)
                row[0] = T.float32(MASKED_SCORE)
                row[1] = T.float32(0)
                for c in range(T.ceildiv(chunk, keys)):
                    for e in range(_ceil(keys * head_dim, nt)):  # K, V chunk → shared
                        if e * nt + tid < keys * head_dim:
                            slot = p * chunk + c * keys + (e * nt + tid) // head_dim
                            col = (e * nt + tid) % head_dim
                            if slot < n and slot < (p + 1) * chunk:
                                ks[(e * nt + tid) // head_dim, col] = key_at(
                                    k, v, kn, freq, slot, kvh, ring_key_position(slot, last, s), col)
                                vs[(e * nt + tid) // head_dim, col] = v[slot, kvh, col]
                            else:
                                ks[(e * nt + tid) // head_dim, col] = T.float32(0)
                                vs[(e * nt + tid) // head_dim, col] = T.float32(0)
                    for e in range(_ceil(rows * keys, nt)):  # scores of the rows × keys tile
                        if e * nt + tid < rows * keys:
                            r = (e * nt + tid) // keys
                            u = (e * nt + tid) % keys
                            i = (tile * rows + r) // group
                            j = p * chunk + c * keys + u
                            kp = ring_key_position(j, last, s)
                            tmp[1] = T.float32(MASKED_SCORE)
                            if i < t and j < n and j < (p + 1) * chunk and causal_window_visible(
                                    j, kp, pos[i], last, window, rch[i]):
                                tmp[1] = T.float32(0)
                                for d in range(head_dim):
                                    tmp[1] = tmp[1] + q[i, kvh * group + (tile * rows + r) % group, d] * ks[u, d]
                            sc[r, u] = tmp[1]
                    if tid < rows:  # online softmax of row tid: new max, rescale, probabilities, denominator
                        online_softmax_update(row, sc, tid, keys)
                        rescale[tid] = row[3]
                        for u in range(keys):
                            tmp[1] = sc[tid, u]  # a shared load may not sit in a branch condition
                            if unmasked(tmp[1]):
                                tmp[1] = T.exp(tmp[1] - row[0])
                                row[1] = row[1] + tmp[1]
                            else:
                                tmp[1] = T.float32(0)
                            pr[tid, u] = tmp[1]
                    for e in range(per_acc):  # acc = acc · rescale + P · V
                        if e * nt + tid < rows * head_dim:
                            acc[e] = acc[e] * rescale[(e * nt + tid) // head_dim]
                            for u in range(keys):
                                acc[e] = acc[e] + pr[(e * nt + tid) // head_dim, u] * vs[u, (e * nt + tid) % head_dim]
                for e in range(per_acc):
                    if e * nt + tid < rows * head_dim:
                        if (tile * rows + (e * nt + tid) // head_dim) // group < t:
                            out[(tile * rows + (e * nt + tid) // head_dim) // group,
                                kvh * group + (tile * rows + (e * nt + tid) // head_dim) % group, p,
                                (e * nt + tid) % head_dim] = acc[e]
                if tid < rows:
                    if (tile * rows + tid) // group < t:
                        out[(tile * rows + tid) // group, kvh * group + (tile * rows + tid) % group, p,
                            head_dim] = row[0]
                        out[(tile * rows + tid) // group, kvh * group + (tile * rows + tid) % group, p,
                            head_dim + 1] = row[1]

    return _attention_func(body, attrs, q_heads, kv_heads, head_dim, parts, k_from_v, reach)


def attention_merge(q_heads: int, head_dim: int, parts: int, name: str) -> tirx.PrimFunc:
    """out[t, h] = Σ_p acc_p·e^(m_p − M) / Σ_p l_p·e^(m_p − M), M = max_p m_p: the exact softmax over
    the key ranges of `attention` (an empty range has m = −3e38 and contributes e^(−∞) = 0)."""
    nt = min(THREADS, 1 << (head_dim - 1).bit_length())
    attrs = _attrs(name)

    @T.prim_func
    def func(part_h: T.handle, out_h: T.handle):
        T.func_attr(attrs)
        t = T.int32()
        part = T.match_buffer(part_h, (t, q_heads, parts, head_dim + 2), F32)
        out = T.match_buffer(out_h, (t, q_heads, head_dim), F32)
        for blk in T.thread_binding(t * q_heads, thread="blockIdx.x"):
            for tid in T.thread_binding(nt, thread="threadIdx.x"):
                stat = T.alloc_buffer((3,), F32, scope="local")  # max, denominator, numerator
                i = blk // q_heads
                h = blk % q_heads
                stat[0] = T.float32(MASKED_SCORE)
                for p in range(parts):
                    stat[0] = T.max(stat[0], part[i, h, p, head_dim])
                stat[1] = T.float32(0)
                for p in range(parts):
                    stat[1] = stat[1] + part[i, h, p, head_dim + 1] * T.exp(part[i, h, p, head_dim] - stat[0])
                for r in range(_ceil(head_dim, nt)):
                    if r * nt + tid < head_dim:
                        stat[2] = T.float32(0)
                        for p in range(parts):
                            stat[2] = stat[2] + part[i, h, p, r * nt + tid] * T.exp(part[i, h, p, head_dim] - stat[0])
                        out[i, h, r * nt + tid] = stat[2] / stat[1]
    return func


def head_norm_rope(total: int, offset: int, heads: int, head_dim: int, eps: float, weighted: bool, rope: bool,
                   name: str, axes: int = 1) -> tirx.PrimFunc:
    """`kernels.head_norm_rope` as one workgroup per (token, head): the threads share the RMS sum
    through shared memory, then each rotates its slice of head_dim (the RoPE partner element is
    normalised again rather than exchanged, which costs one extra load)."""
    nt = min(THREADS, 1 << (head_dim - 1).bit_length())
    per, half = _ceil(head_dim, nt), head_dim // 2

    attrs = _attrs(name)
    def normed(src, w, i, h, d, inv):
        value = src[i, (offset + h) * head_dim + d] * inv
        return value * w[d] if weighted else value

    def rotated(src, w, pos, freq, i, h, d, inv):
        return rope_rotate_axes(lambda e: normed(src, w, i, h, e, inv), lambda a: pos[i] if axes == 1 else pos[i, a],
                                freq, d, head_dim, axes)

    @T.macro
    def body(src, pos, w, freq, out, t):
        for blk in T.thread_binding(t * heads, thread="blockIdx.x"):
            for tid in T.thread_binding(nt, thread="threadIdx.x"):
                red = T.alloc_buffer((nt,), F32, scope="shared")
                inv = T.alloc_buffer((1,), F32, scope="local")
                i = blk // heads
                h = blk % heads
                inv[0] = T.float32(0)
                for r in range(per):
                    if r * nt + tid < head_dim:
                        inv[0] = inv[0] + src[i, (offset + h) * head_dim + r * nt + tid] * src[
                            i, (offset + h) * head_dim + r * nt + tid]
                red[tid] = inv[0]
                inv[0] = T.float32(0)
                for u in range(nt):
                    inv[0] = inv[0] + red[u]
                inv[0] = inv_rms(inv[0], head_dim, eps)
                for r in range(per):
                    if r * nt + tid < head_dim:
                        if rope:
                            out[i, h, r * nt + tid] = rotated(src, w, pos, freq, i, h, r * nt + tid, inv[0])
                        else:
                            out[i, h, r * nt + tid] = normed(src, w, i, h, r * nt + tid, inv[0])

    def pos_shape(t):
        return (t,) if axes == 1 else (t, axes)

    # Four signatures (weight? rope?) around one body; absent operands are passed as `src`.
    if weighted and rope:
        @T.prim_func
        def func_wr(s_h: T.handle, p_h: T.handle, w_h: T.handle, f_h: T.handle, o_h: T.handle):
            T.func_attr(attrs)
            t = T.int32()
            src = T.match_buffer(s_h, (t, total), F32)
            pos = T.match_buffer(p_h, pos_shape(t), I32)
            w = T.match_buffer(w_h, (head_dim,), F32)
            freq = T.match_buffer(f_h, (max(half // axes, 1),), F32)
            out = T.match_buffer(o_h, (t, heads, head_dim), F32)
            body(src, pos, w, freq, out, t)
        return func_wr
    if weighted:
        @T.prim_func
        def func_w(s_h: T.handle, p_h: T.handle, w_h: T.handle, o_h: T.handle):
            T.func_attr(attrs)
            t = T.int32()
            src = T.match_buffer(s_h, (t, total), F32)
            pos = T.match_buffer(p_h, (t,), I32)
            w = T.match_buffer(w_h, (head_dim,), F32)
            out = T.match_buffer(o_h, (t, heads, head_dim), F32)
            body(src, pos, w, src, out, t)
        return func_w
    if rope:
        raise NotImplementedError("RoPE without a norm weight does not occur in Gemma 4")

    @T.prim_func
    def func_n(s_h: T.handle, p_h: T.handle, o_h: T.handle):
        T.func_attr(attrs)
        t = T.int32()
        src = T.match_buffer(s_h, (t, total), F32)
        pos = T.match_buffer(p_h, (t,), I32)
        out = T.match_buffer(o_h, (t, heads, head_dim), F32)
        body(src, pos, src, src, out, t)
    return func_n


def cache_write(kv_heads: int, head_dim: int, name: str) -> tirx.PrimFunc:
    """`kernels.cache_write`: one thread per written element."""
    width = kv_heads * head_dim

    attrs = _attrs(name)
    @T.prim_func
    def func(cache_h: T.handle, new_h: T.handle, pos_h: T.handle):
        T.func_attr(attrs)
        r, t = T.int32(), T.int32()
        cache = T.match_buffer(cache_h, (r, kv_heads, head_dim), F32)
        new = T.match_buffer(new_h, (t, kv_heads, head_dim), F32)
        pos = T.match_buffer(pos_h, (t,), I32)
        for blk in T.thread_binding(T.ceildiv(t * width, THREADS), thread="blockIdx.x"):
            for tid in T.thread_binding(THREADS, thread="threadIdx.x"):
                if blk * THREADS + tid < t * width:
                    cache[ring_slot(pos[(blk * THREADS + tid) // width], r), (blk * THREADS + tid) % width // head_dim,
                          (blk * THREADS + tid) % head_dim] = new[(blk * THREADS + tid) // width,
                                                                   (blk * THREADS + tid) % width // head_dim,
                                                                   (blk * THREADS + tid) % head_dim]
    return func


def router_topk(experts: int, top_k: int, name: str) -> tirx.PrimFunc:
    """`kernels.router_topk` (`kernel_math.route_top_k`) with one thread per token (experts ≤ a few
    hundred: a serial scan)."""
    attrs = _attrs(name)
    @T.prim_func
    def func(logits_h: T.handle, pes_h: T.handle, idx_h: T.handle, w_h: T.handle):
        T.func_attr(attrs)
        t = T.int32()
        logits = T.match_buffer(logits_h, (t, experts), F32)
        pes = T.match_buffer(pes_h, (experts,), F32)
        idx = T.match_buffer(idx_h, (t, top_k), I32)
        w = T.match_buffer(w_h, (t, top_k), F32)
        for blk in T.thread_binding(T.ceildiv(t, THREADS), thread="blockIdx.x"):
            for tid in T.thread_binding(THREADS, thread="threadIdx.x"):
                probs = T.alloc_buffer((experts,), F32, scope="local")
                acc = T.alloc_buffer((3,), F32, scope="local")
                best = T.alloc_buffer((1,), I32, scope="local")
                i = blk * THREADS + tid
                if i < t:
                    route_top_k(logits, pes, idx, w, i, probs, acc, best, experts, top_k)
    return func


def moe_gate_up(hidden: int, inter: int, experts: int, top_k: int, name: str,
                storage: str = "float32") -> tirx.PrimFunc:
    """act[t, j, c] = gelu(gate_e[c]·x[t]) · (up_e[c]·x[t]) · w[t, j] for e = idx[t, j]: one workgroup
    per (token, slot, row); the threads split the dot product (coalesced weight reads) and reduce
    through shared memory. With `moe_down`, the GPU form of `kernels.moe_experts`. The bank gate_up
    [E, 2I, H] is stored as `storage`: a float dtype, or q8/q4 (data and scales, dequantized as read:
    `kernel_math.weight_at`)."""
    nt, attrs = THREADS, _attrs(name)

    @T.prim_func
    def func():
        T.func_attr(attrs)
        t = T.int32()
        x = param("x", (t, hidden), F32)
        idx = param("idx", (t, top_k), I32)
        w = param("w", (t, top_k), F32)
        gate_up = weight_param("gate_up", (experts, 2 * inter, hidden), storage)
        act = param("act", (t, top_k, inter), F32)
        for blk in T.thread_binding(t * top_k * inter, thread="blockIdx.x"):
            for tid in T.thread_binding(nt, thread="threadIdx.x"):
                red = T.alloc_buffer((2, nt), F32, scope="shared")
                sums = T.alloc_buffer((2,), F32, scope="local")
                i = blk // (top_k * inter)
                j = blk // inter % top_k
                c = blk % inter
                sums[0] = T.float32(0)
                sums[1] = T.float32(0)
                for r in range(_ceil(hidden, nt)):
                    if r * nt + tid < hidden:
                        sums[0] = sums[0] + x[i, r * nt + tid] * weight_at(gate_up, (idx[i, j], c), r * nt + tid,
                                                                           storage)
                        sums[1] = sums[1] + x[i, r * nt + tid] * weight_at(gate_up, (idx[i, j], inter + c),
                                                                           r * nt + tid, storage)
                red[0, tid] = sums[0]
                red[1, tid] = sums[1]
                if tid == 0:
                    sums[0] = T.float32(0)
                    sums[1] = T.float32(0)
                    for u in range(nt):
                        sums[0] = sums[0] + red[0, u]
                        sums[1] = sums[1] + red[1, u]
                    act[i, j, c] = gelu_tanh(sums[0]) * sums[1] * w[i, j]
    return func


def moe_down(hidden: int, inter: int, experts: int, top_k: int, name: str, storage: str = "float32") -> tirx.PrimFunc:
    """out[t, o] = Σ_j down_e[o]·act[t, j] for e = idx[t, j]: one workgroup per (token, output row); the
    bank down [E, H, I] is stored as `storage` (as in `moe_gate_up`)."""
    nt, attrs = THREADS, _attrs(name)

    @T.prim_func
    def func():
        T.func_attr(attrs)
        t = T.int32()
        act = param("act", (t, top_k, inter), F32)
        idx = param("idx", (t, top_k), I32)
        down = weight_param("down", (experts, hidden, inter), storage)
        out = param("out", (t, hidden), F32)
        for blk in T.thread_binding(t * hidden, thread="blockIdx.x"):
            for tid in T.thread_binding(nt, thread="threadIdx.x"):
                red = T.alloc_buffer((nt,), F32, scope="shared")
                total = T.alloc_buffer((1,), F32, scope="local")
                i = blk // hidden
                o = blk % hidden
                total[0] = T.float32(0)
                for j in range(top_k):
                    for r in range(_ceil(inter, nt)):
                        if r * nt + tid < inter:
                            total[0] = total[0] + act[i, j, r * nt + tid] * weight_at(down, (idx[i, j], o),
                                                                                      r * nt + tid, storage)
                red[tid] = total[0]
                if tid == 0:
                    total[0] = T.float32(0)
                    for u in range(nt):
                        total[0] = total[0] + red[u]
                    out[i, o] = total[0]
    return func


# The tiled GEMM (`_tiled_gemm`) of prefill linears (`linear_tiled`: tiles of consecutive tokens) and
# grouped MoE (`moe_align` sorts the (token, slot) entries by expert into tiles of one expert): a
# workgroup multiplies one tile of GEMM_TILE entries by GEMM_ROWS weight rows, chunk by chunk through
# shared memory, so each weight row is read once per tile instead of once per entry.
GEMM_TILE = 16  # entries (tokens, or routed (token, slot) pairs) per tile
GEMM_ROWS = 32  # weight rows per workgroup
GEMM_K = 32  # reduction chunk held in shared memory
GEMM_THREADS = 128  # thread = (entry, group of 4 rows): 16 × 8


def moe_align(experts: int, top_k: int, name: str) -> tirx.PrimFunc:
    """Sort the routed entries e = token·top_k + slot by expert into tiles: tile_expert[q] is the expert
    of tile q (−1 past the last tile), tile_entries[q] its up-to-GEMM_TILE entries in token order (−1
    pads); tile and entry numbers index the [T, top_k] buffers flat. One workgroup; thread x counts
    expert x's entries, then writes its tiles after the tiles of the experts before it. There are at
    most min(entries, entries / GEMM_TILE + experts) tiles."""
    nt, tile = 256, GEMM_TILE
    attrs = _attrs(name)

    @T.prim_func
    def func(idx_h: T.handle, te_h: T.handle, ent_h: T.handle):
        T.func_attr(attrs)
        t = T.int32()
        idx = T.match_buffer(idx_h, (t, top_k), I32)
        tile_expert = T.match_buffer(te_h, (t, top_k), I32)
        tile_entries = T.match_buffer(ent_h, (t, top_k, tile), I32)
        for blk in T.thread_binding(1, thread="blockIdx.x"):
            for tid in T.thread_binding(nt, thread="threadIdx.x"):
                count = T.alloc_buffer((experts,), I32, scope="shared")
                first = T.alloc_buffer((experts + 1,), I32, scope="shared")  # first tile of each expert; total
                c = T.alloc_buffer((2,), I32, scope="local")  # entries seen, first tile
                for m in range(_ceil(experts, nt)):
                    if m * nt + tid < experts:
                        c[0] = 0
                        for x in range(t * top_k):
                            if idx[x // top_k, x % top_k] == m * nt + tid:
                                c[0] = c[0] + 1
                        count[m * nt + tid] = c[0]
                for m in range(_ceil(experts + 1, nt)):
                    if m * nt + tid <= experts:
                        c[0] = 0
                        for x in range(experts):
                            if x < m * nt + tid:
                                c[0] = c[0] + T.floordiv(count[x] + (tile - 1), tile)
                        first[m * nt + tid] = c[0]
                for m in range(_ceil(experts, nt)):
                    if m * nt + tid < experts:
                        c[0] = 0
                        c[1] = first[m * nt + tid]
                        for x in range(t * top_k):
                            if idx[x // top_k, x % top_k] == m * nt + tid:
                                q = c[1] + c[0] // tile
                                tile_expert[q // top_k, q % top_k] = m * nt + tid
                                tile_entries[q // top_k, q % top_k, c[0] % tile] = x
                                c[0] = c[0] + 1
                        for u in range(tile):
                            if c[0] % tile != 0 and u >= c[0] % tile:
                                q = c[1] + c[0] // tile
                                tile_entries[q // top_k, q % top_k, u] = -1
                c[1] = first[experts]  # a shared load may not sit in a branch condition
                for m in range(T.ceildiv(t * top_k, nt)):
                    if m * nt + tid < t * top_k and m * nt + tid >= c[1]:
                        tile_expert[(m * nt + tid) // top_k, (m * nt + tid) % top_k] = -1
    return func


def _grouped_tiles(t, top_k: int, experts: int):
    return T.min(t * top_k, T.ceildiv(t * top_k, GEMM_TILE) + experts)


def _tiled_gemm(rows: int, depth: int, name: str, storage: str, mode: str, experts: int = 1, top_k: int = 1):
    """A GEMM over tiles of GEMM_TILE entries: workgroup (tile, row block) multiplies GEMM_ROWS weight
    rows with the tile's entries, both staged in shared memory GEMM_K columns at a time; thread
    (entry u, row group) accumulates GEMM_ROWS / 8 rows, so each weight element is read once per tile.
    mode "dense": y[t] = W·x[t] over tiles of consecutive tokens (a prefill linear);
    "gate_up"/"down": `moe_align`'s tiles of one expert's (token, slot) entries e: act[e] =
    gelu(gate·x)·(up·x)·w[e] with x the token's row, or part[e] = down·act[e]. The weight is stored
    as `storage`: a float dtype, or q8/q4 (data and scales, dequantized as it is staged:
    `kernel_math.weight_at`)."""
    nt, tile, rt, kc = GEMM_THREADS, GEMM_TILE, GEMM_ROWS, GEMM_K
    mats, per = 2 if mode == "gate_up" else 1, rt // (nt // tile)
    row_tiles, chunks = _ceil(rows, rt), _ceil(depth, kc)
    assert tile * kc % nt == 0 and rt * kc % nt == 0
    attrs = _attrs(name)

    def tiles(t):
        return T.ceildiv(t, tile) if mode == "dense" else _grouped_tiles(t, top_k, experts)

    def expert(tile_expert, q):
        return 0 if mode == "dense" else tile_expert[q // top_k, q % top_k]

    def entry(tile_entries, q, u, t):  # entry u of tile q, −1 for padding
        if mode == "dense":
            return tirx.if_then_else(q * tile + u < t, q * tile + u, -1)
        return tile_entries[q // top_k, q % top_k, u]

    def source(src, ent, col):  # the entry's input element
        if mode == "dense":
            return src[ent, col]
        return src[ent // top_k, col] if mode == "gate_up" else src[ent // top_k, ent % top_k, col]

    def weight_of(weight, ex, m, row, col):  # element (row, col) of matrix m (gate, up) of expert ex, as fp32
        index = (row,) if mode == "dense" else (ex, m * rows + row)
        return weight_at(weight, index, col, storage)

    @T.macro
    def body(src, w, weight, tile_expert, tile_entries, out, t):
        for blk in T.thread_binding(tiles(t) * row_tiles, thread="blockIdx.x"):
            for tid in T.thread_binding(nt, thread="threadIdx.x"):
                xs = T.alloc_buffer((tile, kc), F32, scope="shared")
                ws = T.alloc_buffer((mats, rt, kc), F32, scope="shared")
                acc = T.alloc_buffer((mats, per), F32, scope="local")
                q = blk // row_tiles
                r0 = blk % row_tiles * rt
                ex = expert(tile_expert, q)
                for m in range(mats):
                    for r in range(per):
                        acc[m, r] = T.float32(0)
                for k in range(T.if_then_else(ex >= 0, chunks, 0)):
                    for i in range(tile * kc // nt):  # entries' inputs → xs
                        ent = entry(tile_entries, q, (i * nt + tid) // kc, t)
                        col = k * kc + (i * nt + tid) % kc
                        if ent >= 0 and col < depth:
                            xs[(i * nt + tid) // kc, (i * nt + tid) % kc] = source(src, ent, col)
                        else:
                            xs[(i * nt + tid) // kc, (i * nt + tid) % kc] = T.float32(0)
                    for i in range(mats * rt * kc // nt):  # weight rows → ws
                        m = (i * nt + tid) // (rt * kc)
                        row = r0 + (i * nt + tid) // kc % rt
                        col = k * kc + (i * nt + tid) % kc
                        if row < rows and col < depth:
                            ws[m, row - r0, (i * nt + tid) % kc] = weight_of(weight, ex, m, row, col)
                        else:
                            ws[m, row - r0, (i * nt + tid) % kc] = T.float32(0)
                    for d in range(kc):
                        for m in range(mats):
                            for r in range(per):
                                acc[m, r] = acc[m, r] + ws[m, tid // tile * per + r, d] * xs[tid % tile, d]
                ent = entry(tile_entries, q, tid % tile, t)
                for r in range(per):
                    if ex >= 0 and ent >= 0 and r0 + tid // tile * per + r < rows:
                        if mode == "dense":
                            out[ent, r0 + tid // tile * per + r] = acc[0, r]
                        elif mode == "gate_up":
                            out[ent // top_k, ent % top_k, r0 + tid // tile * per + r] = (
                                gelu_tanh(acc[0, r]) * acc[mats - 1, r] * w[ent // top_k, ent % top_k])
                        else:
                            out[ent // top_k, ent % top_k, r0 + tid // tile * per + r] = acc[0, r]

    if mode == "dense":
        @T.prim_func
        def dense():
            T.func_attr(attrs)
            t = T.int32()
            x = param("x", (t, depth), F32)
            weight = weight_param("w", (rows, depth), storage)
            y = param("y", (t, rows), F32)
            body(x, x, weight, x, x, y, t)
        return dense

    if mode == "gate_up":
        @T.prim_func
        def gate_up():
            T.func_attr(attrs)
            t = T.int32()
            x = param("x", (t, depth), F32)
            w = param("w", (t, top_k), F32)
            weight = weight_param("gate_up", (experts, 2 * rows, depth), storage)
            tile_expert = param("tile_expert", (t, top_k), I32)
            tile_entries = param("tile_entries", (t, top_k, tile), I32)
            act = param("act", (t, top_k, rows), F32)
            body(x, w, weight, tile_expert, tile_entries, act, t)
        return gate_up

    @T.prim_func
    def down():
        T.func_attr(attrs)
        t = T.int32()
        act = param("act", (t, top_k, depth), F32)
        weight = weight_param("down", (experts, rows, depth), storage)
        tile_expert = param("tile_expert", (t, top_k), I32)
        tile_entries = param("tile_entries", (t, top_k, tile), I32)
        part = param("part", (t, top_k, rows), F32)
        body(act, act, weight, tile_expert, tile_entries, part, t)
    return down


def linear_tiled(k: int, n: int, name: str, dtype: str = "float32") -> tirx.PrimFunc:
    """`kernels.linear` as a shared-memory tiled GEMM (`_tiled_gemm`, tiles of GEMM_TILE tokens ×
    GEMM_ROWS rows): prefill linears where dlight's Matmul rule is not used (Metal)."""
    return _tiled_gemm(n, k, name, dtype, "dense")


def moe_gate_up_grouped(hidden: int, inter: int, experts: int, top_k: int, name: str,
                        storage: str = "float32") -> tirx.PrimFunc:
    """`moe_gate_up` over `moe_align`'s tiles: act[e] = gelu(gate·x)·(up·x)·w[e] (`_tiled_gemm`); the
    bank stored as `storage` (a float dtype or q8/q4)."""
    return _tiled_gemm(inter, hidden, name, storage, "gate_up", experts, top_k)


def moe_down_grouped(hidden: int, inter: int, experts: int, top_k: int, name: str,
                     storage: str = "float32") -> tirx.PrimFunc:
    """Down-projection over `moe_align`'s tiles: part[e, o] = down_x[o]·act[e] (`_tiled_gemm`);
    `moe_combine` sums a token's top_k parts. The bank stored as `storage` (a float dtype or q8/q4)."""
    return _tiled_gemm(hidden, inter, name, storage, "down", experts, top_k)


def moe_combine(hidden: int, top_k: int, name: str) -> tirx.PrimFunc:
    """out[t, o] = Σ_j part[t·top_k + j, o]: the experts' outputs of a token, in slot order."""
    nt = THREADS
    attrs = _attrs(name)

    @T.prim_func
    def func(part_h: T.handle, out_h: T.handle):
        T.func_attr(attrs)
        t = T.int32()
        part = T.match_buffer(part_h, (t, top_k, hidden), F32)
        out = T.match_buffer(out_h, (t, hidden), F32)
        for blk in T.thread_binding(T.ceildiv(t * hidden, nt), thread="blockIdx.x"):
            for tid in T.thread_binding(nt, thread="threadIdx.x"):
                total = T.alloc_buffer((1,), F32, scope="local")
                if blk * nt + tid < t * hidden:
                    total[0] = T.float32(0)
                    for j in range(top_k):
                        total[0] = total[0] + part[(blk * nt + tid) // hidden, j, (blk * nt + tid) % hidden]
                    out[(blk * nt + tid) // hidden, (blk * nt + tid) % hidden] = total[0]
    return func


def embed_rows(lo: int, rows: int, hidden: int, name: str, storage: str = "float32") -> tirx.PrimFunc:
    """out[i] = table[ids[i] - lo] for the tokens whose id falls in this slice [lo, lo + rows) of an
    embedding table split to fit a storage binding; other rows of `out` are left to the other slices
    (every id lies in exactly one). The slice is stored as `storage` (a float dtype, or q8/q4 blocks
    dequantized as gathered)."""
    nt, attrs = THREADS, _attrs(name)

    @T.prim_func
    def func():
        T.func_attr(attrs)
        t = T.int32()
        table = weight_param("table", (rows, hidden), storage)
        ids = param("ids", (t,), I32)
        out = param("out", (t, hidden), F32)
        for blk in T.thread_binding(t, thread="blockIdx.x"):
            for tid in T.thread_binding(nt, thread="threadIdx.x"):
                for r in range(_ceil(hidden, nt)):
                    if r * nt + tid < hidden and lo <= ids[blk] and ids[blk] < lo + rows:
                        out[blk, r * nt + tid] = weight_at(table, ids[blk] - lo, r * nt + tid, storage)
    return func


def place_columns(lo: int, width: int, total: int, name: str) -> tirx.PrimFunc:
    """out[:, lo:lo+width] = part: reassembles logits computed slice by slice over a split LM head."""
    nt = THREADS
    attrs = _attrs(name)

    @T.prim_func
    def func(part_h: T.handle, out_h: T.handle):
        T.func_attr(attrs)
        t = T.int32()
        part = T.match_buffer(part_h, (t, width), F32)
        out = T.match_buffer(out_h, (t, total), F32)
        for blk in T.thread_binding(T.ceildiv(t * width, nt), thread="blockIdx.x"):
            for tid in T.thread_binding(nt, thread="threadIdx.x"):
                if blk * nt + tid < t * width:
                    out[(blk * nt + tid) // width, lo + (blk * nt + tid) % width] = part[
                        (blk * nt + tid) // width, (blk * nt + tid) % width]
    return func


def local_attention(heads: int, head_dim: int, rel_rows: int, chunk: int, context_left: int, context_right: int,
                    softcap: float, invalid_logit: float, name: str) -> tirx.PrimFunc:
    """`audio_kernels.local_attention` (the audio conformer's chunked attention) as one thread per
    (query, head): its `width` = chunk + context logits in registers, then the softmax and P·V, the
    same formula term by term (masked logits are `invalid_logit` and stay in the softmax, keys outside
    the clip weigh zero rows). The TE form's [S, heads, width] stages would be global scratch buffers
    here, which WGSL launches cannot bind."""
    past, future = context_left - 1, context_right
    width = chunk + past + future
    attrs = _attrs(name)

    @T.prim_func
    def func(q_h: T.handle, k_h: T.handle, v_h: T.handle, r_h: T.handle, o_h: T.handle):
        T.func_attr(attrs)
        s = T.int32()
        q = T.match_buffer(q_h, (s, heads, head_dim), F32)
        k = T.match_buffer(k_h, (s, heads, head_dim), F32)
        v = T.match_buffer(v_h, (s, heads, head_dim), F32)
        rel = T.match_buffer(r_h, (rel_rows, heads, head_dim), F32)
        out = T.match_buffer(o_h, (s, heads, head_dim), F32)
        for blk in T.thread_binding(T.ceildiv(s * heads, THREADS), thread="blockIdx.x"):
            for tid in T.thread_binding(THREADS, thread="threadIdx.x"):
                sc = T.alloc_buffer((width,), F32, scope="local")
                acc = T.alloc_buffer((head_dim,), F32, scope="local")
                st = T.alloc_buffer((3,), F32, scope="local")  # max, denominator, scratch
                if blk * THREADS + tid < s * heads:
                    t = (blk * THREADS + tid) // heads
                    h = (blk * THREADS + tid) % heads
                    st[0] = T.float32(-3.0e38)
                    for j in range(width):
                        sc[j] = T.float32(invalid_logit)
                        if t - t % chunk + j - past >= 0 and t - t % chunk + j - past < s and (
                                (t % chunk - j + past >= 0 and t % chunk - j + past < past)
                                or (t % chunk - j + past < 0 and j - past - t % chunk < future)):
                            st[2] = T.float32(0)
                            for d in range(head_dim):
                                if j - t % chunk >= 0 and j - t % chunk < rel_rows:
                                    st[2] = st[2] + q[t, h, d] * (k[t - t % chunk + j - past, h, d]
                                                                  + rel[j - t % chunk, h, d])
                                else:
                                    st[2] = st[2] + q[t, h, d] * k[t - t % chunk + j - past, h, d]
                            sc[j] = T.float32(softcap) * T.tanh(st[2] / T.float32(softcap))
                        st[0] = T.max(st[0], sc[j])
                    st[1] = T.float32(0)
                    for e in range(head_dim):
                        acc[e] = T.float32(0)
                    for j in range(width):
                        st[2] = T.exp(sc[j] - st[0])
                        st[1] = st[1] + st[2]
                        if t - t % chunk + j - past >= 0 and t - t % chunk + j - past < s:
                            for e in range(head_dim):
                                acc[e] = acc[e] + st[2] * v[t - t % chunk + j - past, h, e]
                    for e in range(head_dim):
                        out[t, h, e] = acc[e] / st[1]

    return func
