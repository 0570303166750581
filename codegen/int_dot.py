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

from tvm import tirx
from tvm.script import tirx as T

from g4c.codegen.kernel_math import F32, quant_scale_dtype
from g4c.quant import BITS, GROUP

ROWS_PER_TASK = 8  # weight rows per parallel task (their bytes stay in L1 across token tiles)
TOKEN_TILE = 4  # token rows that share one unpacking of a weight chunk (prefill)
BIAS = {"q4": 8, "q8": 128}
INTRINSIC = {64: "llvm.x86.avx512.vpdpbusd.512", 32: "llvm.x86.avx512.vpdpbusd.256",
             16: "llvm.x86.avx512.vpdpbusd.128"}
# the LLVM features `linear_qdot` needs (AVX-512 VNNI with byte/word ops and 128/256-bit forms)
REQUIRED_FEATURES = ("avx512vnni", "avx512bw", "avx512vl")


def chunk_bytes(k: int, scheme: str) -> int:
    """The widest chunk (64, 32 or 16 bytes) that divides a row of k weights."""
    row = k * BITS[scheme] // 8
    return next(w for w in (64, 32, 16) if row % w == 0)


def _dot(acc, unsigned, signed, width: int):
    """acc + Σ₄ unsigned·signed per int32 lane (`vpdpbusd`)."""
    return T.call_llvm_pure_intrin(f"int32x{width // 4}", INTRINSIC[width], acc,
                                   T.reinterpret(f"int8x{width}", unsigned), signed)


def linear_qdot(k: int, n: int, scheme: str, name: str, rows: int | None = None) -> tirx.PrimFunc:
    """y[t, n] = x[t, k] · Wᵀ with W (`data` uint8 [n, k·bits/8], `scales` fp16 or fp32 [n, k/32]) multiplied by
    integer dot products against x quantized to int8 per group (module docstring); `rows` = 1 for a
    decode step (one token, no token tiles)."""
    assert k % GROUP == 0, "group-quantized rows are whole groups"
    width = chunk_bytes(k, scheme)
    lanes, chunks, groups = width // 4, k * BITS[scheme] // 8 // width, k // GROUP
    per_chunk = width // (16 if scheme == "q4" else 32)  # groups in one chunk
    per_group = lanes // per_chunk  # int32 lanes of one group's dot product
    bias = BIAS[scheme]
    tile = 1 if rows == 1 else TOKEN_TILE
    task_rows = next(r for r in (ROWS_PER_TASK, 4, 2, 1) if n % r == 0)
    spread = [lane // per_group for lane in range(lanes)]  # lane → its group within the chunk
    t = tirx.IntImm("int64", 1) if rows == 1 else tirx.Var("t", "int64")
    scale_dtype = quant_scale_dtype()  # float16 on CPUs

    def act_index(g, e):
        """Where activation e (0..31) of group g sits in the per-chunk order of the weight bytes."""
        if scheme == "q8":
            return g * GROUP + e
        return (g // per_chunk) * width * 2 + (e // 16) * width + (g % per_chunk) * 16 + e % 16

    @T.prim_func
    def func(x_h: T.handle, data: T.Buffer((n, k * BITS[scheme] // 8), "uint8"),
             scales: T.Buffer((n, groups), scale_dtype), y_h: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        x = T.match_buffer(x_h, (t, k), F32)
        y = T.match_buffer(y_h, (t, n), F32)
        qx = T.alloc_buffer((t, chunks * width * (2 if scheme == "q4" else 1)), "int8")
        dx = T.alloc_buffer((t, chunks * lanes), F32)  # per lane: the activation scale of its group
        offset = T.alloc_buffer((t, chunks * lanes), F32)  # per lane: bias·Σq_x·d_x / lanes per group
        for i in T.parallel(t):
            for g in range(groups):
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
                    qx[i, act_index(g, e)] = T.Cast("int8", q)
                    total[0] = total[0] + T.Cast("int32", q)
                for lane in range(per_group):
                    at = (g // per_chunk) * lanes + (g % per_chunk) * per_group + lane
                    dx[i, at] = d
                    offset[i, at] = T.float32(bias / per_group) * T.Cast(F32, total[0]) * d
        for task in T.parallel(n // task_rows):
            for token_tile in range((t + tile - 1) // tile):
                for r in range(task_rows):
                    j = task * task_rows + r
                    acc = T.alloc_buffer((tile, lanes), F32, scope="local")
                    for u in range(tile):
                        acc[u, T.ramp(0, 1, lanes)] = T.broadcast(T.float32(0), lanes)
                    for c in range(chunks):
                        raw = data[j, T.ramp(c * width, 1, width)]
                        if per_chunk == 1:
                            w_scale = T.broadcast(T.Cast(F32, scales[j, c]), lanes)
                        else:
                            loaded = T.Cast(f"float32x{per_chunk}", scales[j, T.ramp(c * per_chunk, 1, per_chunk)])
                            w_scale = T.Shuffle([loaded] * per_group, spread)
                        for u in T.unroll(tile):
                            i = T.Cast("int32", T.min(token_tile * tile + u, t - 1))  # a short last tile redoes row t-1
                            zero = T.broadcast(T.int32(0), lanes)
                            if scheme == "q4":
                                low = raw & T.broadcast(T.uint8(15), width)
                                high = (raw >> T.broadcast(T.uint8(4), width)) & T.broadcast(T.uint8(15), width)
                                base = c * width * 2
                                dot = _dot(_dot(zero, low, qx[i, T.ramp(base, 1, width)], width), high,
                                           qx[i, T.ramp(base + width, 1, width)], width)
                            else:
                                dot = _dot(zero, raw ^ T.broadcast(T.uint8(128), width),
                                           qx[i, T.ramp(c * width, 1, width)], width)
                            acc[u, T.ramp(0, 1, lanes)] = acc[u, T.ramp(0, 1, lanes)] + w_scale * (
                                dx[i, T.ramp(c * lanes, 1, lanes)] * T.Cast(f"float32x{lanes}", dot)
                                - offset[i, T.ramp(c * lanes, 1, lanes)])  # ramps written inline: contiguous loads
                    for u in range(tile):
                        i = T.Cast("int32", T.min(token_tile * tile + u, t - 1))
                        y[i, j] = T.float32(0)
                        for lane in range(lanes):
                            y[i, j] = y[i, j] + acc[u, lane]
    return func
