"""The math the CPU kernels (`g4c.codegen.kernels`) and the GPU kernels (`g4c.codegen.gpu_kernels`)
share, written once: weight reads (float storage or group-quantized, `weight_at`), GELU, the RMS
scale, rotate_half RoPE, the KV-cache ring slots and attention mask, the online softmax update and
the router's softmax top-k.

Expression builders take and return TIR expressions, so they serve TE `compute` lambdas and
TVMScript bodies alike (a TVMScript kernel calls them like any Python function). The two multi-
statement helpers (`online_softmax_update`, `route_top_k`) are TVMScript macros, expanded in place
in the kernel that calls them; their scratch buffers are the caller's, so each target picks their
scope. All arithmetic is fp32.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

from tvm import tirx
from tvm.script import tirx as T

from g4c.quant import SCHEMES, packed_shapes

F32 = "float32"

# Weight storage: fp32, fp16, or bf16 carried as its uint16 bit pattern (numpy/DLPack have no bf16).
STORAGE = {"float32": F32, "float16": "float16", "bfloat16": "uint16", "uint32": "uint32",
           "uint8": "uint8"}  # uint32/uint8: quantized data

MASKED_SCORE = -3.0e38  # the score of a masked key; also the initial running max of a softmax


def load_weight(value, dtype: str):
    """A stored weight element `value` (storage dtype `STORAGE[dtype]`) as fp32; bf16 is the upper
    half of an fp32 bit pattern."""
    if dtype == "bfloat16":
        return tirx.reinterpret(F32, value.astype("uint32") << tirx.const(16, "uint32"))
    return value.astype(F32) if dtype != "float32" else value


def gelu_tanh(x):
    """GELU, tanh approximation: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""
    c, k = tirx.const(math.sqrt(2.0 / math.pi), F32), tirx.const(0.044715, F32)
    return tirx.const(0.5, F32) * x * (tirx.const(1.0, F32) + tirx.tanh(c * (x + k * x * x * x)))


def inv_rms(sum_squares, dim: int, eps: float):
    """(Σx² / dim + eps)^-0.5: the RMS-norm scale of a row of `dim` elements."""
    return tirx.power(sum_squares / tirx.const(dim, F32) + tirx.const(eps, F32), tirx.const(-0.5, F32))


def rope_rotate(element, position, inv_freq, d, head_dim: int):
    """Element `d` of a head rotated by rotate_half RoPE at `position`:
    x[d]·cos θ + partner·sin θ with θ = position · inv_freq[d mod half], partner = −x[d + half] in the
    first half and x[d − half] in the second. `element(e)` gives the unrotated x[e]; the partner
    index is (d + half) mod head_dim, which is both, so neither branch reads out of bounds."""
    assert head_dim % 2 == 0, "rotate_half RoPE pairs the two halves of a head"
    half = head_dim // 2
    angle = position.astype(F32) * inv_freq[tirx.floormod(d, half)]
    other = tirx.floormod(d + half, head_dim)
    partner = tirx.if_then_else(d < half, -element(other), element(other))
    return element(d) * tirx.cos(angle) + partner * tirx.sin(angle)


def rope_rotate_axes(element, position, inv_freq, d, head_dim: int, axes: int = 1):
    """`rope_rotate` for axial RoPE: the head is cut into `axes` parts of head_dim/axes channels and
    part a is rotated on its own at `position(a)` (the vision tower: x, then y); `axes` 1 is plain RoPE
    at `position(0)`. `inv_freq` has head_dim/axes/2 entries."""
    if axes == 1:
        return rope_rotate(element, position(0), inv_freq, d, head_dim)
    sub = head_dim // axes
    part = tirx.floordiv(d, sub)
    return rope_rotate(lambda e: element(part * sub + e), position(part), inv_freq, tirx.floormod(d, sub), sub)


def ring_slot(position, slots):
    """The cache slot of `position` in a cache of `slots` slots: position mod slots. A ring buffer
    keeps the newest positions; a full cache has more slots than positions, so the slot is the
    position itself."""
    return tirx.floormod(position, slots)


def ring_key_position(slot, last, slots):
    """The position held by `slot` of a cache view of `slots` slots holding positions 0..last: the
    newest p ≤ last with p ≡ slot (mod slots), i.e. the inverse of `ring_slot`; for a full cache
    (slots > last) the slot itself. Valid for written slots (slot ≤ last)."""
    return slot + slots * tirx.floordiv(last - slot, slots)


def causal_window_visible(slot, key_position, query_position, last, window: int | None, reach=None):
    """Whether the key in `slot` (at `key_position`, see `ring_key_position`) is visible to the query
    at `query_position`: the slot is written (slot ≤ last), not past the query's reach (default:
    causal, key ≤ query; an image's soft tokens reach the end of their block) and, for a sliding
    layer, within `window` positions back."""
    visible = tirx.all(slot <= last, key_position <= (query_position if reach is None else reach))
    if window:
        visible = tirx.all(visible, query_position - key_position < window)
    return visible


def unmasked(score):
    """Whether a score is a real key's (masked keys score `MASKED_SCORE`)."""
    return score > tirx.const(MASKED_SCORE / 2, F32)


@T.macro
def online_softmax_update(stat, scores, row, keys):
    """One chunk of an online softmax: `stat` (4 fp32) holds the running max [0] and denominator [1]
    over the chunks seen so far; the chunk's scores are scores[row, 0:keys]. Sets stat[2] to the new
    max and stat[3] to e^(old max − new max), rescales the denominator and moves the max. The caller
    then rescales its accumulators by stat[3] and adds the chunk's probabilities e^(score − stat[0])
    of its `unmasked` scores to stat[1] and its accumulators."""
    stat[2] = stat[0]
    for u in range(keys):
        stat[2] = T.max(stat[2], scores[row, u])
    stat[3] = T.exp(stat[0] - stat[2])
    stat[1] = stat[1] * stat[3]
    stat[0] = stat[2]


@T.macro
def route_top_k(logits, pes, idx, w, i, probs, acc, best, experts, top_k):
    """Route token i: softmax over the `experts` logits[i], the top_k probabilities (first index wins
    ties) renormalised to sum 1, times per_expert_scale `pes`, into idx[i] / w[i]. Scratch: probs
    (experts fp32; a taken expert is marked −1), acc (3 fp32: max logit, softmax sum, top-k sum),
    best (1 index)."""
    acc[0] = T.float32(MASKED_SCORE)
    for e in range(experts):
        acc[0] = T.max(acc[0], logits[i, e])
    acc[1] = T.float32(0)
    for e in range(experts):
        probs[e] = T.exp(logits[i, e] - acc[0])
        acc[1] = acc[1] + probs[e]
    for e in range(experts):
        probs[e] = probs[e] / acc[1]
    acc[2] = T.float32(0)
    for j in range(top_k):
        best[0] = -1
        for e in range(experts):
            if probs[e] >= T.float32(0):
                if best[0] < 0:
                    best[0] = e
                elif probs[e] > probs[best[0]]:
                    best[0] = e
        idx[i, j] = best[0]
        w[i, j] = probs[best[0]]
        acc[2] = acc[2] + probs[best[0]]
        probs[best[0]] = T.float32(-1)
    for j in range(top_k):
        w[i, j] = w[i, j] / acc[2] * pes[idx[i, j]]


_QUANT_WORD = contextvars.ContextVar("g4c_quant_word", default=("uint32", F32))


@contextlib.contextmanager
def quant_word(word: str, scale: str = F32):
    """Build kernels whose quantized data is declared in `word`s (`g4c.quant`: uint32 for GPUs, whose
    shading languages load 32-bit words; uint8 for CPUs, which then load a group's bytes as vectors)
    and whose scales are stored as `scale` (float16 on CPUs; computed with in fp32)."""
    token = _QUANT_WORD.set((word, scale))
    try:
        yield
    finally:
        _QUANT_WORD.reset(token)


def quant_shapes(shape, scheme: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(data, scales) shapes of a quantized weight in the current word (`quant_word`)."""
    return packed_shapes(tuple(shape), scheme, _QUANT_WORD.get()[0])


def quant_data_dtype() -> str:
    return _QUANT_WORD.get()[0]


def quant_scale_dtype() -> str:
    return _QUANT_WORD.get()[1]


def dequant(data, scales, row, k, scheme: str):
    """Element (row, k) of a group-quantized weight as fp32 (`g4c.quant`'s layout: `data` [..., rows,
    K·bits/8 bytes] as uint32 or uint8 words, `scales` float16/32 [..., rows, K/32]); `row` is one index
    or a tuple of the leading indices (an expert bank [E, N, K]: (expert, n)). Works on TE tensors and
    TIR buffers, so the dequantization is fused into whatever kernel reads the weight."""
    u32 = "uint32"
    lead = tuple(row) if isinstance(row, (tuple, list)) else (row,)
    scale = scales[(*lead, k // 32)].astype(F32)
    if data.dtype == "uint8":  # bytes: a group's values are consecutive loads
        return _dequant_bytes(data, lead, k, scheme) * scale
    if scheme == "q8":  # byte k % 4 of word k // 4, sign-extended by an arithmetic shift
        # (shifted down to the low byte first: its shift (k % 4)·8 grows with k, so a vectorized read of a
        # word's 4 bytes shifts by a ramp of stride +8; `(3 - k % 4)·8` is a ramp of stride −8, which TVM's
        # simplifier cannot cast to uint32: CUDA's GEMV failed "cannot make uint from negative value -8")
        word = data[(*lead, k // 4)]
        byte = word >> ((k % 4) * 8).astype(u32)
        value = tirx.reinterpret("int32", byte << tirx.const(24, u32)) >> 24
    elif scheme == "q4":  # group k // 32: byte b = e % 16 of its 16 holds e (low nibble) and e + 16 (high)
        e = k % 32
        b = e % 16
        word = data[(*lead, (k // 32) * 4 + b // 4)]
        value = ((word >> (8 * (b % 4) + 4 * (e // 16)).astype(u32)) & tirx.const(15, u32)).astype("int32") - 8
    else:
        raise ValueError(f"unknown quantization {scheme!r}")
    return value.astype(F32) * scale


def _dequant_bytes(data, lead: tuple, k, scheme: str):
    """The integer value of element k of a uint8-declared quantized row, as fp32 (before its scale)."""
    if scheme == "q8":
        return tirx.reinterpret("int8", data[(*lead, k)]).astype(F32)
    if scheme == "q4":  # byte (k // 32)·16 + k % 16; the high nibble for the group's second half
        e = k % 32
        byte = data[(*lead, (k // 32) * 16 + e % 16)]
        return ((byte >> (4 * (e // 16)).astype("uint8")) & tirx.const(15, "uint8")).astype(F32) - tirx.const(8.0, F32)
    raise ValueError(f"unknown quantization {scheme!r}")


def quantized(storage: str) -> bool:
    """Whether a weight storage is a group quantization (`g4c.quant.SCHEMES`: q8, q4), whose weight is
    a (data, scales) pair, rather than a float dtype (`STORAGE`: float32, float16, bfloat16)."""
    return storage in SCHEMES


def param(name: str, shape, dtype: str):
    """Declare the next parameter of the TVMScript kernel being parsed, as a buffer (called in the
    kernel's body, so parameters can follow `weight_param`'s storage-dependent ones in order)."""
    return T.match_buffer(T.arg(name, T.handle()), shape, dtype)


def weight_param(name: str, shape: tuple[int, ...], storage: str):
    """Declare the parameter(s) of a [..., K] weight stored as `storage` in the TVMScript kernel being
    parsed: one buffer for a float dtype, or two for a quantization, its data (uint32 words) then its
    scales (float32) in `g4c.quant`'s layout. Returns what `weight_at` reads (the buffer, or the
    (data, scales) pair), so a kernel has one signature and one body whatever its weights' storage."""
    if quantized(storage):
        data, scales = quant_shapes(shape, storage)
        return param(f"{name}_data", data, quant_data_dtype()), param(f"{name}_scales", scales, quant_scale_dtype())
    return param(name, tuple(shape), STORAGE[storage])


def weight_at(weight, index, k, storage: str):
    """Element (*index, k) of a weight as fp32, whatever its storage: `weight` is its buffer for a float
    dtype (`load_weight`), its (data, scales) pair for a quantization (`dequant`, fused into the read:
    no dequantized copy exists). `index`: the leading indices (one, or a tuple: (expert, row))."""
    index = tuple(index) if isinstance(index, (tuple, list)) else (index,)
    if quantized(storage):
        data, scales = weight
        return dequant(data, scales, index, k, storage)
    return load_weight(weight[(*index, k)], storage)
