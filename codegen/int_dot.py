"""Quantized linears with integer dot products (`linear_qdot`): y = x · Wᵀ for a group-quantized W
(`g4c.quant`, q8/q4), the way llama.cpp multiplies Q8_0/Q4_0 weights on CPUs.

Float dequantization spends several vector instructions per weight (widen, convert, scale, FMA), so
a CPU decode GEMV on 4- or 8-bit weights is bound by instructions, not by memory. Here each token
row of x is first quantized to int8 per group of 32 (scale d = max|x|/127, q = round(x/d), as
llama.cpp's Q8_0 activations), then one `vpdpbusd` (x86 AVX-512 VNNI / AVX-VNNI) multiplies 64
unsigned weight bytes with 64 signed activation bytes and adds them four by four into 16 int32
lanes. The integer dot products are exact; the only rounding is the activations' int8 step (the
error llama.cpp has at the same bits) and fp32 accumulation across groups.

Weights enter the unsigned operand biased: a q4 nibble n is w/scale + 8, a q8 byte w xor 0x80 is
w/scale + 128, so each group's integer dot is Σ (q_w + bias)·q_x, and the bias term bias·Σq_x is
subtracted per group from the activation side (computed once per token, not per weight).

Layout of one weight row read in chunks of W bytes (W = 64, 32 or 16: the widest that divides the
row; a chunk fills one 512/256/128-bit register):
- q8: a chunk holds W/32 whole groups in order; the activations are read in the same order;
- q4: a chunk holds W/16 groups of 16 bytes (Q4_0: byte b = value b | value b+16 << 4); the low
  nibbles (values 0..15 of each group) and the high nibbles (16..31) are two dot products against
  the activations rearranged per chunk as [low halves of its groups | high halves].
Lane l of a chunk's int32 result belongs to group l // (lanes per group), so the per-group scales
(weight scale · activation scale) are applied lane-wise before the fp32 accumulation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

from g4c.codegen.kernel_math import F32, gelu_tanh, param, quant_data_dtype, quant_scale_dtype, weight_param
from g4c.codegen.kernels import I64
from g4c.quant import BITS, GROUP

ROWS_PER_TASK = 8  # weight rows per parallel task (their bytes stay in L1 across token tiles)
TOKEN_TILE = 2  # token rows that share one unpacking of a weight chunk (prefill)
ROW_BLOCK = 8  # weight rows that share the token rows' loads (prefill; ROW_BLOCK x TOKEN_TILE accumulators)
BIAS = {"q4": 8, "q8": 128}
INTRINSIC = {64: "llvm.x86.avx512.vpdpbusd.512", 32: "llvm.x86.avx512.vpdpbusd.256",
             16: "llvm.x86.avx512.vpdpbusd.128"}
# the LLVM features `linear_qdot` needs (AVX-512 VNNI with byte/word ops and 128/256-bit forms)
REQUIRED_FEATURES = ("avx512vnni", "avx512bw", "avx512vl")


@dataclass(frozen=True)
class Layout:
    """How rows of k weights in `scheme` are read: chunks of `width` bytes, `lanes` int32 results each."""

    k: int
    scheme: str

    @property
    def row_bytes(self) -> int:
        return self.k * BITS[self.scheme] // 8

    @property
    def width(self) -> int:  # the widest register (64, 32 or 16 bytes) that divides a row
        return next(w for w in (64, 32, 16) if self.row_bytes % w == 0)

    @property
    def lanes(self) -> int:
        return self.width // 4

    @property
    def chunks(self) -> int:
        return self.row_bytes // self.width

    @property
    def groups(self) -> int:
        return self.k // GROUP

    @property
    def per_chunk(self) -> int:  # groups in one chunk
        return self.width // (16 if self.scheme == "q4" else 32)

    @property
    def per_group(self) -> int:  # int32 lanes of one group's dot product
        return self.lanes // self.per_chunk

    @property
    def activation_bytes(self) -> int:  # q4 reads the activations twice per chunk (low, high nibbles)
        return self.chunks * self.width * (2 if self.scheme == "q4" else 1)

    def activation_index(self, g, e):
        """Where activation e (0..31) of group g sits: in the per-chunk order of the weight bytes."""
        if self.scheme == "q8":
            return g * GROUP + e
        return (g // self.per_chunk) * self.width * 2 + (e // 16) * self.width + (g % self.per_chunk) * 16 + e % 16


def _dot(acc, unsigned, signed, width: int):
    """acc + Σ₄ unsigned·signed per int32 lane (`vpdpbusd`)."""
    return T.call_llvm_pure_intrin(f"int32x{width // 4}", INTRINSIC[width], acc,
                                   T.reinterpret(f"int8x{width}", unsigned), signed)


def weight_scales(lay: Layout, scales, row: tuple, c):
    """The fp32 weight scale of each int32 lane of chunk c of weight row `row` (its leading indices)."""
    if lay.per_chunk == 1:
        return T.broadcast(T.Cast(F32, scales[(*row, c)]), lay.lanes)
    loaded = T.Cast(f"float32x{lay.per_chunk}", scales[(*row, T.ramp(c * lay.per_chunk, 1, lay.per_chunk))])
    return T.Shuffle([loaded] * lay.per_group, [lane // lay.per_group for lane in range(lay.lanes)])


def unpack(lay: Layout, raw) -> list:
    """A chunk of weight bytes as the unsigned operands of its dot products (weight + bias): q4 its low
    and high nibbles, q8 its bytes with the sign bit flipped."""
    width = lay.width
    if lay.scheme == "q4":
        nibble = T.broadcast(T.uint8(15), width)
        return [raw & nibble, (raw >> T.broadcast(T.uint8(4), width)) & nibble]
    return [raw ^ T.broadcast(T.uint8(128), width)]


def chunk_sum(lay: Layout, operands: list, w_scale, qx, dx, offset, i, c):
    """The fp32 lanes chunk c adds to row i's dot product: w_scale · (d_x · Σ(q_w + bias)·q_x − offset)."""
    width, lanes = lay.width, lay.lanes
    dot = T.broadcast(T.int32(0), lanes)
    for half, operand in enumerate(operands):
        dot = _dot(dot, operand, qx[i, T.ramp((c * len(operands) + half) * width, 1, width)], width)
    return w_scale * (dx[i, T.ramp(c * lanes, 1, lanes)] * T.Cast(f"float32x{lanes}", dot)
                      - offset[i, T.ramp(c * lanes, 1, lanes)])


def quantize_activations(lay: Layout):
    """A macro: rows x[rows, k] rounded to int8 per group of 32 (d = max|x|/127, q = round(x/d)) into
    qx (the chunk order of `Layout.activation_index`), with each lane's d in dx and bias·Σq·d spread
    over a group's lanes in offset."""
    bias, per_group, per_chunk, lanes = BIAS[lay.scheme], lay.per_group, lay.per_chunk, lay.lanes

    @T.macro
    def quantize(x, rows, qx, dx, offset):
        for i in T.parallel(rows):
            for g in range(lay.groups):
                amax = T.alloc_buffer((1,), F32)
                total = T.alloc_buffer((1,), "int32")
                amax[0] = T.float32(0)
                total[0] = 0
                for e in range(GROUP):
                    amax[0] = T.max(amax[0], T.fabs(x[i, g * GROUP + e]))
                d = amax[0] / T.float32(127)
                inv = T.if_then_else(d > T.float32(0), T.float32(1) / d, T.float32(0))
                for e in range(GROUP):
                    q = T.nearbyint(x[i, g * GROUP + e] * inv)
                    qx[i, lay.activation_index(g, e)] = T.Cast("int8", q)
                    total[0] = total[0] + T.Cast("int32", q)
                for lane in range(per_group):
                    at = (g // per_chunk) * lanes + (g % per_chunk) * per_group + lane
                    dx[i, at] = d
                    offset[i, at] = T.float32(bias / per_group) * T.Cast(F32, total[0]) * d
    return quantize


def linear_qdot(k: int, n: int, scheme: str, name: str, rows: int | None = None) -> tirx.PrimFunc:
    """y[t, n] = x[t, k] · Wᵀ with W (`data` uint8 [n, k·bits/8], `scales` fp16 or fp32 [n, k/32])
    multiplied by integer dot products against x quantized to int8 per group (module docstring);
    `rows` = 1 for a decode step (one token, no token tiles). A task's weight rows are unpacked once
    per chunk for a tile of tokens."""
    assert k % GROUP == 0, "group-quantized rows are whole groups"
    lay = Layout(k, scheme)
    tile = 1 if rows == 1 else TOKEN_TILE
    task_rows = next(r for r in (ROWS_PER_TASK, 4, 2, 1) if n % r == 0)
    block = 1 if rows == 1 else math.gcd(ROW_BLOCK, task_rows)  # weight rows whose dot products share token loads
    t = tirx.IntImm("int64", 1) if rows == 1 else tirx.Var("t", "int64")
    quantize = quantize_activations(lay)

    @T.prim_func
    def func(x_h: T.handle, data: T.Buffer((n, lay.row_bytes), "uint8"),
             scales: T.Buffer((n, lay.groups), quant_scale_dtype()), y_h: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        x = T.match_buffer(x_h, (t, k), F32)
        y = T.match_buffer(y_h, (t, n), F32)
        qx = T.alloc_buffer((t, lay.activation_bytes), "int8")
        dx = T.alloc_buffer((t, lay.chunks * lay.lanes), F32)
        offset = T.alloc_buffer((t, lay.chunks * lay.lanes), F32)
        quantize(x, t, qx, dx, offset)
        for task in T.parallel(n // task_rows):
            for token_tile in range((t + tile - 1) // tile):
                for rb in range(task_rows // block):
                    acc = T.alloc_buffer((block, tile, lay.lanes), F32, scope="local")
                    for r, u in T.grid(block, tile):
                        acc[r, u, T.ramp(0, 1, lay.lanes)] = T.broadcast(T.float32(0), lay.lanes)
                    for c in range(lay.chunks):
                        for r in T.unroll(block):
                            j = task * task_rows + rb * block + r
                            operands = unpack(lay, data[j, T.ramp(c * lay.width, 1, lay.width)])
                            w_scale = weight_scales(lay, scales, (j,), c)
                            for u in T.unroll(tile):
                                i = T.Cast("int32", T.min(token_tile * tile + u, t - 1))  # a short last tile redoes row t-1
                                acc[r, u, T.ramp(0, 1, lay.lanes)] = acc[r, u, T.ramp(0, 1, lay.lanes)] + chunk_sum(
                                    lay, operands, w_scale, qx, dx, offset, i, c)
                    for r, u in T.grid(block, tile):
                        j = task * task_rows + rb * block + r
                        i = T.Cast("int32", T.min(token_tile * tile + u, t - 1))
                        y[i, j] = T.float32(0)
                        for lane in range(lay.lanes):
                            y[i, j] = y[i, j] + acc[r, u, lane]
    return func


def moe_experts_qdot(hidden: int, inter: int, experts: int, top_k: int, name: str, gate_up_storage: str,
                     down_storage: str) -> tirx.PrimFunc:
    """`kernels.moe_experts` (same signature, tasks and grouping by expert) for group-quantized expert
    banks, with integer dot products: the token rows x are rounded to int8 once for the gate/up banks,
    and the activated rows gelu(gate)·up·w once for the down bank."""
    assert quant_data_dtype() == "uint8", "integer dot products read the blocks as bytes (a CPU's quant_word)"
    up, down_lay = Layout(hidden, gate_up_storage), Layout(inter, down_storage)
    rows_i, rows_h = math.gcd(16, inter), math.gcd(16, hidden)  # expert rows per task
    quantize_x, quantize_act = quantize_activations(up), quantize_activations(down_lay)

    @T.prim_func
    def func():
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        t = T.int64()
        x = param("x", (t, hidden), F32)
        idx = param("idx", (t, top_k), I64)
        w = param("w", (t, top_k), F32)
        gate_up, gate_up_scales = weight_param("gate_up", (experts, 2 * inter, hidden), gate_up_storage)
        down, down_scales = weight_param("down", (experts, hidden, inter), down_storage)
        out = param("out", (t, hidden), F32)
        qx = T.alloc_buffer((t, up.activation_bytes), "int8")
        dx = T.alloc_buffer((t, up.chunks * up.lanes), F32)
        ox = T.alloc_buffer((t, up.chunks * up.lanes), F32)
        act = T.alloc_buffer((t * top_k, inter), F32)
        qa = T.alloc_buffer((t * top_k, down_lay.activation_bytes), "int8")
        da = T.alloc_buffer((t * top_k, down_lay.chunks * down_lay.lanes), F32)
        oa = T.alloc_buffer((t * top_k, down_lay.chunks * down_lay.lanes), F32)
        part = T.alloc_buffer((t, top_k, hidden), F32)
        quantize_x(x, t, qx, dx, ox)
        for task in T.parallel((inter // rows_i) * experts):
            acc = T.alloc_buffer((2, up.lanes), F32, scope="local")
            e = task % experts
            for i in range(t):
                for j in range(top_k):
                    if idx[i, j] == T.Cast(I64, e):
                        for r in range(rows_i):
                            c = task // experts * rows_i + r
                            for h in range(2):  # gate row c, up row inter + c
                                acc[h, T.ramp(0, 1, up.lanes)] = T.broadcast(T.float32(0), up.lanes)
                                for ch in range(up.chunks):
                                    acc[h, T.ramp(0, 1, up.lanes)] = acc[h, T.ramp(0, 1, up.lanes)] + chunk_sum(
                                        up, unpack(up, gate_up[e, h * inter + c, T.ramp(ch * up.width, 1, up.width)]),
                                        weight_scales(up, gate_up_scales, (e, h * inter + c), ch), qx, dx, ox, i, ch)
                                for lane in range(1, up.lanes):
                                    acc[h, 0] = acc[h, 0] + acc[h, lane]
                            act[i * top_k + j, c] = gelu_tanh(acc[0, 0]) * acc[1, 0] * w[i, j]
        quantize_act(act, t * top_k, qa, da, oa)
        for task in T.parallel((hidden // rows_h) * experts):
            acc2 = T.alloc_buffer((down_lay.lanes,), F32, scope="local")
            e = task % experts
            for i in range(t):
                for j in range(top_k):
                    if idx[i, j] == T.Cast(I64, e):
                        for r in range(rows_h):
                            o = task // experts * rows_h + r
                            acc2[T.ramp(0, 1, down_lay.lanes)] = T.broadcast(T.float32(0), down_lay.lanes)
                            for ch in range(down_lay.chunks):
                                acc2[T.ramp(0, 1, down_lay.lanes)] = acc2[T.ramp(0, 1, down_lay.lanes)] + chunk_sum(
                                    down_lay, unpack(down_lay, down[e, o, T.ramp(ch * down_lay.width, 1, down_lay.width)]),
                                    weight_scales(down_lay, down_scales, (e, o), ch), qa, da, oa, i * top_k + j, ch)
                            for lane in range(1, down_lay.lanes):
                                acc2[0] = acc2[0] + acc2[lane]
                            part[i, j, o] = acc2[0]
        for i in T.parallel(t):
            for o in range(hidden):
                out[i, o] = part[i, 0, o]
                for j in range(1, top_k):
                    out[i, o] = out[i, o] + part[i, j, o]
    return func
