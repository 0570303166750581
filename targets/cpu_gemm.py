"""The CPU prefill linear (`linear`, `linear_q` with a symbolic token count): a register-blocked GEMM
(llvm and arm targets; decode's one-token linears are separate GEMV kernels, `targets.llvm`).

y[t, n] = Σ_k x[t, k] · w[n, k], w stored as fp32/fp16/bf16 or group-quantized (dequantized where it
is read, `kernel_math.weight_at`). The weight stays in its checkpoint layout [N, K] (row n is
contiguous), so every SIMD register holds `vector` consecutive k of one row and each accumulator is a
vector of partial sums, reduced to y at the end.

Why not the GEMV's dot products: they load one x vector and one w vector per FMA, and a long k row
evicts the other rows from L1 before they are reused, so a prefill GEMM ran at a third of the FMA
peak (and slower for k in the thousands). Here tokens are cut in panels of `token_panel` rows (each
panel's x stays in L2 while every weight row passes once); a panel's tasks are blocks of
`column_block` weight rows; k is cut in chunks of `k_chunk` (the block's weight chunk stays in L1
while every token block of the panel uses it); a token block of `token_block` rows keeps
token_block × column_block vector accumulators in registers, so each k-step loads token_block +
column_block vectors for token_block × column_block FMAs. A stored fp16/bf16 or quantized weight
chunk is converted to fp32 once per panel, not once per token. Partial sums are carried across k
chunks in a per-task buffer (panel × column_block vectors) and reduced at the end. Tokens left over
from the blocks (and chunks of fewer tokens than a block) go one at a time.

Exact as a reordering of an fp32 sum: every product is formed once in fp32 and added in a different
order than the reference (the tests compare against float64 within the usual tolerance).
"""

from __future__ import annotations

import math

from tvm.script import tirx as T

from g4c.codegen.kernel_math import F32, gelu_tanh, param, quant_word, weight_at, weight_param

# hand-picked defaults (the first value of each knob in `gemm_knob_space`)
VECTOR = 16  # fp32 lanes per accumulator (one AVX-512 register)
TOKEN_BLOCK = 4  # token rows sharing each weight vector load (GEMM)
COLUMN_BLOCK = 4  # weight rows sharing each x vector load (GEMM)
TOKEN_PANEL = 128  # token rows whose x stays in L2 while the weight streams
K_CHUNK = 512  # k elements of a weight block kept in L1


def gemm_knob_space(k: int) -> dict[str, list[int]]:
    """Knobs of `linear_kernel`, hand values first; `vector` must divide k."""
    vectors = [v for v in (VECTOR, 8, 32) if k % v == 0]
    if not vectors:
        return {}
    return {"vector": vectors, "token_block": [TOKEN_BLOCK, 2, 6], "column_block": [COLUMN_BLOCK, 2, 8],
            "token_panel": [TOKEN_PANEL, 64, 256], "k_chunk": [K_CHUNK, 256, 1024]}


def supports(k: int) -> bool:
    """Whether `linear_kernel` builds for a reduction of k (vectors of whole k)."""
    return bool(gemm_knob_space(k))


CPU_WORDS = ("uint8", "float16")  # how CPU targets store quantized data and scales (LoweringOptions)


def linear_kernel(k: int, n: int, storage: str, name: str, words: tuple[str, str] = CPU_WORDS,
                  vector: int = VECTOR, token_block: int = TOKEN_BLOCK,
                  column_block: int = COLUMN_BLOCK, token_panel: int = TOKEN_PANEL,
                  k_chunk: int = K_CHUNK):
    """The PrimFunc `name`(x [T, k], weight [n, k] in `storage` (its data and scales for a quantization,
    declared in `words`), y [T, n]) with the parameters of `codegen.kernels.linear` / `linear_q`."""
    assert k % vector == 0, "vectors of whole k"
    cb = math.gcd(n, column_block)
    tb, tp = token_block, max(token_panel // token_block, 1) * token_block
    kc = math.gcd(k, max(k_chunk // vector, 1) * vector)  # a multiple of `vector` that divides k
    lanes = vector
    convert = storage != "float32"

    def chunk(w, block, task, b, c, e):
        """Weight element e of row b of the task's block in k chunk c, as fp32."""
        return block[b * kc + e] if convert else w[task * cb + b, c * kc + e]

    @T.macro
    def token_rows(x, w, block, part, row0, i, c, task):
        """One token row (x row `row0 + i`) against the block's `cb` rows over k chunk c, into part[i]."""
        acc = T.decl_buffer((cb * lanes,), F32, scope="local")
        for b in T.unroll(cb):
            for l in T.vectorized(lanes):
                acc[b * lanes + l] = T.if_then_else(c == 0, T.float32(0), part[(i * cb + b) * lanes + l])
        for kk in range(kc // lanes):
            for b in T.unroll(cb):
                for l in T.vectorized(lanes):
                    acc[b * lanes + l] = acc[b * lanes + l] + x[row0 + i, c * kc + kk * lanes + l] * chunk(
                        w, block, task, b, c, kk * lanes + l)
        for b in T.unroll(cb):
            for l in T.vectorized(lanes):
                part[(i * cb + b) * lanes + l] = acc[b * lanes + l]

    @T.macro
    def gemm(x, w, y, t):
        for panel in range((t + tp - 1) // tp):
            for task in T.parallel(n // cb):
                part = T.decl_buffer((tp * cb * lanes,), F32, scope="local")
                rows = T.min(T.int64(tp), t - panel * tp)
                for c in range(k // kc):
                    block = T.decl_buffer((cb * kc,), F32, scope="local")
                    if convert:  # the block's weight chunk in fp32, converted once for the panel
                        for b in range(cb):
                            for kk in range(kc // lanes):
                                for l in T.vectorized(lanes):
                                    block[b * kc + kk * lanes + l] = weight_at(
                                        w, task * cb + b, c * kc + kk * lanes + l, storage)
                    for blk in range(rows // tb):
                        acc = T.decl_buffer((tb * cb * lanes,), F32, scope="local")
                        for a in T.unroll(tb):
                            for b in T.unroll(cb):
                                for l in T.vectorized(lanes):
                                    acc[(a * cb + b) * lanes + l] = T.if_then_else(
                                        c == 0, T.float32(0), part[((blk * tb + a) * cb + b) * lanes + l])
                        for kk in range(kc // lanes):
                            for a in T.unroll(tb):
                                for b in T.unroll(cb):
                                    for l in T.vectorized(lanes):
                                        acc[(a * cb + b) * lanes + l] = acc[(a * cb + b) * lanes + l] + x[
                                            panel * tp + blk * tb + a, c * kc + kk * lanes + l] * chunk(
                                            w, block, task, b, c, kk * lanes + l)
                        for a in T.unroll(tb):
                            for b in T.unroll(cb):
                                for l in T.vectorized(lanes):
                                    part[((blk * tb + a) * cb + b) * lanes + l] = acc[(a * cb + b) * lanes + l]
                    for i in range(rows // tb * tb, rows):
                        token_rows(x, w, block, part, panel * tp, i, c, task)
                for i in range(rows):
                    for b in T.unroll(cb):
                        y[panel * tp + i, task * cb + b] = T.float32(0)
                        for l in range(lanes):
                            y[panel * tp + i, task * cb + b] = y[panel * tp + i, task * cb + b] + part[
                                (i * cb + b) * lanes + l]

    with quant_word(*words):
        @T.prim_func
        def func():
            T.func_attr({"global_symbol": name, "tirx.noalias": True})
            t = T.int64()
            x = param("x", (t, k), F32)
            w = weight_param("w", (n, k), storage)
            y = param("y", (t, n), F32)
            gemm(x, w, y, t)
    return func


def storage_of(spec) -> str:
    """The weight storage of a `linear` / `linear_q` spec: its float dtype or its quantization."""
    return spec["scheme"] if spec.op == "linear_q" else spec.kwargs.get("dtype", "float32")


MOE_TOKEN_BLOCK = 2  # (token, slot) pairs of one expert sharing each expert-row vector load
MOE_ROW_BLOCK = 4  # expert rows (gate and up: 2x) sharing each activation vector load
ROW_SPLITS = 4  # parts of every expert's rows: the threads' shares of the task range


class _ExpertTasks:
    """Task → (expert, first row) for a GEMM over every expert's `blocks` row blocks of `rows` rows,
    ordered (row split, expert, block): a thread's contiguous range of tasks streams contiguous rows of
    one expert after another, and with up to ROW_SPLITS threads each takes an equal part of every
    expert's rows, however the tokens are routed."""

    def __init__(self, experts: int, blocks: int, rows: int):
        self.experts, self.rows = experts, rows
        self.per = blocks // math.gcd(blocks, ROW_SPLITS)  # blocks per split

    def expert(self, task):
        return task % (self.experts * self.per) // self.per

    def row(self, task):
        return (task // (self.experts * self.per) * self.per + task % self.per) * self.rows


def moe_experts_kernel(hidden: int, inter: int, experts: int, top_k: int, name: str,
                       gate_up_storage: str = "float32", down_storage: str = "float32",
                       words: tuple[str, str] = CPU_WORDS, token_block: int = MOE_TOKEN_BLOCK,
                       row_block: int = MOE_ROW_BLOCK):
    """`codegen.kernels.moe_experts` (same parameters and result) as grouped GEMMs: the (token, slot)
    pairs are first listed by expert (a counting sort, in token order), then each task (a block of an
    expert's rows) runs the same register blocking as `linear_kernel` over its expert's pairs, token
    blocks of `token_block` pairs (their x rows gathered) against `row_block` rows (gate and up rows
    together in the first GEMM), so an expert row loaded from cache serves several tokens and an x
    vector several rows. Pairs left over from the blocks go one at a time. For prefill (op
    `moe_experts_grouped`): decode's one token keeps `moe_experts`, whose tasks of more rows suit
    the 8 scattered rows it reads."""
    tb = token_block
    rb, rd = math.gcd(inter, row_block), math.gcd(hidden, row_block)
    gu_tasks, down_tasks = _ExpertTasks(experts, inter // rb, rb), _ExpertTasks(experts, hidden // rd, rd)
    vh, vi = math.gcd(VECTOR, hidden), math.gcd(VECTOR, inter)

    @T.macro
    def group_by_expert(idx, t, count, start, order):
        for e in range(experts + 1):
            count[e] = T.int64(0)
        for p in range(t * top_k):
            count[idx[p // top_k, p % top_k]] = count[idx[p // top_k, p % top_k]] + 1
        start[0] = T.int64(0)
        for e in range(experts):
            start[e + 1] = start[e] + count[e]
            count[e] = start[e]  # now the next free place of expert e
        for p in range(t * top_k):
            order[count[idx[p // top_k, p % top_k]]] = p
            count[idx[p // top_k, p % top_k]] = count[idx[p // top_k, p % top_k]] + 1

    @T.macro
    def gate_up_rows(x, w, gate_up, act, order, first, pairs, e, r0, n_tok):
        """act of `n_tok` pairs order[first:] for rows r0..r0+rb of expert e (gate rows, then up rows)."""
        acc = T.decl_buffer((n_tok * 2 * rb * vh,), F32, scope="local")
        token = T.decl_buffer((n_tok,), "int64", scope="local")  # the gathered x rows, read once
        for a in T.unroll(n_tok):
            token[a] = order[first + a] // top_k
            for b in T.unroll(2 * rb):
                for l in T.vectorized(vh):
                    acc[(a * 2 * rb + b) * vh + l] = T.float32(0)
        for kk in range(hidden // vh):
            for a in T.unroll(n_tok):
                for b in T.unroll(2 * rb):
                    for l in T.vectorized(vh):
                        acc[(a * 2 * rb + b) * vh + l] = acc[(a * 2 * rb + b) * vh + l] + x[
                            token[a], kk * vh + l] * weight_at(
                            gate_up, (e, r0 + b % rb + b // rb * inter), kk * vh + l, gate_up_storage)
        for a in T.unroll(n_tok):
            for b in T.unroll(rb):
                pairs[0] = T.float32(0)
                pairs[1] = T.float32(0)
                for l in range(vh):
                    pairs[0] = pairs[0] + acc[(a * 2 * rb + b) * vh + l]
                    pairs[1] = pairs[1] + acc[(a * 2 * rb + rb + b) * vh + l]
                act[order[first + a], r0 + b] = gelu_tanh(pairs[0]) * pairs[1] * w[
                    order[first + a] // top_k, order[first + a] % top_k]

    @T.macro
    def down_rows(act, down, part, order, first, e, o0, n_tok):
        acc = T.decl_buffer((n_tok * rd * vi,), F32, scope="local")
        pair = T.decl_buffer((n_tok,), "int64", scope="local")
        for a in T.unroll(n_tok):
            pair[a] = order[first + a]
            for b in T.unroll(rd):
                for l in T.vectorized(vi):
                    acc[(a * rd + b) * vi + l] = T.float32(0)
        for kk in range(inter // vi):
            for a in T.unroll(n_tok):
                for b in T.unroll(rd):
                    for l in T.vectorized(vi):
                        acc[(a * rd + b) * vi + l] = acc[(a * rd + b) * vi + l] + act[
                            pair[a], kk * vi + l] * weight_at(down, (e, o0 + b), kk * vi + l, down_storage)
        for a in T.unroll(n_tok):
            for b in T.unroll(rd):
                part[order[first + a], o0 + b] = T.float32(0)
                for l in range(vi):
                    part[order[first + a], o0 + b] = part[order[first + a], o0 + b] + acc[(a * rd + b) * vi + l]

    with quant_word(*words):
        @T.prim_func
        def func():
            T.func_attr({"global_symbol": name, "tirx.noalias": True})
            t = T.int64()
            x = param("x", (t, hidden), F32)
            idx = param("idx", (t, top_k), "int64")
            w = param("w", (t, top_k), F32)
            gate_up = weight_param("gate_up", (experts, 2 * inter, hidden), gate_up_storage)
            down = weight_param("down", (experts, hidden, inter), down_storage)
            out = param("out", (t, hidden), F32)
            count = T.alloc_buffer((experts + 1,), "int64")
            start = T.alloc_buffer((experts + 1,), "int64")
            order = T.alloc_buffer((t * top_k,), "int64")
            act = T.alloc_buffer((t * top_k, inter), F32)
            part = T.alloc_buffer((t * top_k, hidden), F32)
            group_by_expert(idx, t, count, start, order)
            for task in T.parallel((inter // rb) * experts):
                pairs = T.decl_buffer((2,), F32, scope="local")
                e, r0 = gu_tasks.expert(task), gu_tasks.row(task)
                n_e = start[e + 1] - start[e]
                for blk in range(n_e // tb):
                    gate_up_rows(x, w, gate_up, act, order, start[e] + blk * tb, pairs, e, r0, tb)
                for p in range(n_e // tb * tb, n_e):
                    gate_up_rows(x, w, gate_up, act, order, start[e] + p, pairs, e, r0, 1)
            for task in T.parallel((hidden // rd) * experts):
                e, o0 = down_tasks.expert(task), down_tasks.row(task)
                n_e = start[e + 1] - start[e]
                for blk in range(n_e // tb):
                    down_rows(act, down, part, order, start[e] + blk * tb, e, o0, tb)
                for p in range(n_e // tb * tb, n_e):
                    down_rows(act, down, part, order, start[e] + p, e, o0, 1)
            for i in T.parallel(t):
                for o in range(hidden):
                    out[i, o] = part[i * top_k, o]
                    for j in range(1, top_k):
                        out[i, o] = out[i, o] + part[i * top_k + j, o]
    return func
