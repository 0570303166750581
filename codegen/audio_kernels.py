"""TensorIR kernels for the audio tower's ops (`g4c.audio`), written with TVM's tensor expression
language (TE) like `g4c.codegen.kernels`.

One builder per IR op; each returns a `tirx.PrimFunc` for one static configuration, with symbolic
row counts (`tirx.Var("T")` for an op's input rows, `"S"` for the rows a convolution produces, in the
target's index dtype), so one build serves every clip length. Kernels are destination-passing: the output is the
last parameter. All arithmetic is fp32. Shapes given as tuples may hold symbol names (`("T", 4, 8)`):
each name becomes one `tirx.Var` of the kernel.

The semantics are `g4c.ir.interpreter`'s (the tests check every kernel against it). `conv2d` reads
no `rows` buffer: its output buffer's shape carries the length. `local_attention` computes each
query's `width` logits straight from the unpadded q/k/v (no block padding): the masked logits, whose
values transformers discards, are never formed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from tvm import te, tirx

from g4c.codegen.kernel_math import F32

Shape = tuple[int | str, ...]


def _prim(args, name: str) -> tirx.PrimFunc:
    return te.create_prim_func(args).with_attr("global_symbol", name)


def _const(value: float):
    return tirx.const(value, F32)


def _var(name: str) -> tirx.Var:
    """A row count in the target's index dtype (GPU targets: int32, like every other kernel's T)."""
    from g4c.codegen.kernels import _INDEX

    return tirx.Var(name, _INDEX.get())


def _dims(shape: Shape, symbols: dict[str, tirx.Var] | None = None) -> tuple:
    """`shape` with each symbol name replaced by one int64 Var (shared through `symbols`)."""
    symbols = {} if symbols is None else symbols
    return tuple(symbols.setdefault(d, _var(d)) if isinstance(d, str) else d for d in shape)


def _clamp_index(index, size):
    """An index kept inside [0, size) so a masked-out read stays in bounds."""
    return tirx.max(tirx.min(index, size - 1), 0)


def _sigmoid(x):
    return _const(1.0) / (_const(1.0) + tirx.exp(-x))  # exp overflow gives 1/inf = 0, not NaN


def conv2d(freq: int, cin: int, cout: int, kernel: int, stride: int, padding: int, name: str) -> tirx.PrimFunc:
    """Buffers: x [T, freq, cin], w [cout, cin, kernel, kernel], out [S, F', cout] with
    F' = (freq + 2·padding - kernel) // stride + 1; S is the output buffer's length (the IR op's
    `rows`): rows or columns outside x read zero."""
    t, rows = _var("T"), _var("S")
    f_out = (freq + 2 * padding - kernel) // stride + 1
    x = te.placeholder((t, freq, cin), F32, name="x")
    w = te.placeholder((cout, cin, kernel, kernel), F32, name="w")
    c, a, b = (te.reduce_axis((0, n), name=axis) for n, axis in ((cin, "c"), (kernel, "a"), (kernel, "b")))

    def tap(r, f, o):
        row, col = r * stride + a - padding, f * stride + b - padding
        inside = tirx.all(row >= 0, row < t, col >= 0, col < freq)
        value = x[_clamp_index(row, t), _clamp_index(col, freq), c]
        return tirx.if_then_else(inside, value, _const(0.0)) * w[o, c, a, b]

    out = te.compute((rows, f_out, cout), lambda r, f, o: te.sum(tap(r, f, o), axis=[c, a, b]), name="out")
    return _prim([x, w, out], name)


def layer_norm(shape: Shape, eps: float, name: str) -> tirx.PrimFunc:
    """Buffers: x `shape` (last axis C), w [C], out `shape`."""
    dims = _dims(shape)
    rows, dim = dims[:-1], dims[-1]
    x = te.placeholder(dims, F32, name="x")
    w = te.placeholder((dim,), F32, name="w")
    r = te.reduce_axis((0, dim), name="r")
    total = te.compute(rows, lambda *i: te.sum(x[(*i, r)], axis=r), name="total")

    def centred(i):
        return x[i] - total[i[:-1]] / _const(dim)

    r2 = te.reduce_axis((0, dim), name="r2")
    sq = te.compute(rows, lambda *i: te.sum(centred((*i, r2)) * centred((*i, r2)), axis=r2), name="sq")
    out = te.compute(dims, lambda *i: centred(i) * tirx.power(sq[i[:-1]] / _const(dim) + _const(eps), _const(-0.5))
                     * w[i[-1]], name="out")
    return _prim([x, w, out], name)


def _unary(shape: Shape, fn: Callable, name: str) -> tirx.PrimFunc:
    dims = _dims(shape)
    x = te.placeholder(dims, F32, name="x")
    out = te.compute(dims, lambda *i: fn(x[i]), name="out")
    return _prim([x, out], name)


def relu(shape: Shape, name: str) -> tirx.PrimFunc:
    """Buffers: x, out `shape`."""
    return _unary(shape, lambda v: tirx.max(v, _const(0.0)), name)


def silu(shape: Shape, name: str) -> tirx.PrimFunc:
    """Buffers: x, out `shape`."""
    return _unary(shape, lambda v: v * _sigmoid(v), name)


def softplus(shape: Shape, name: str) -> tirx.PrimFunc:
    """Buffers: x, out `shape`: max(x, 0) + log1p(exp(-|x|)), which cannot overflow."""
    return _unary(shape, lambda v: tirx.max(v, _const(0.0)) + tirx.log1p(tirx.exp(-tirx.abs(v))), name)


def clip(shape: Shape, limit: float, name: str) -> tirx.PrimFunc:
    """Buffers: x, out `shape`: x clamped to ±limit."""
    return _unary(shape, lambda v: tirx.min(tirx.max(v, _const(-limit)), _const(limit)), name)


def clamp(shape: Shape, name: str, bounds: tuple[int, ...] = ()) -> tirx.PrimFunc:
    """Buffers: x `shape`, lo and hi `bounds` (one value: 0-d, the checkpoint's buffers, or [1], as an
    artifact stores them), out `shape`."""
    dims = _dims(shape)
    at = (0,) * len(bounds)
    x = te.placeholder(dims, F32, name="x")
    lo, hi = te.placeholder(tuple(bounds), F32, name="lo"), te.placeholder(tuple(bounds), F32, name="hi")
    out = te.compute(dims, lambda *i: tirx.min(tirx.max(x[i], lo[at]), hi[at]), name="out")
    return _prim([x, lo, hi, out], name)


def _channels(shape: Shape, fn: Callable, name: str) -> tirx.PrimFunc:
    dims = _dims(shape)
    x = te.placeholder(dims, F32, name="x")
    w = te.placeholder((dims[-1],), F32, name="w")
    out = te.compute(dims, lambda *i: fn(x[i], w[i[-1]]), name="out")
    return _prim([x, w, out], name)


def add_channels(shape: Shape, name: str) -> tirx.PrimFunc:
    """Buffers: x `shape` (last axis C), w [C], out `shape`: x + w along the last axis (a bias)."""
    return _channels(shape, lambda a, b: a + b, name)


def mul_channels(shape: Shape, name: str) -> tirx.PrimFunc:
    """Buffers: x `shape` (last axis C), w [C], out `shape`: x · w along the last axis."""
    return _channels(shape, lambda a, b: a * b, name)


def glu(shape: Shape, name: str) -> tirx.PrimFunc:
    """Buffers: x `shape` (last axis 2N), out `shape[:-1] + (N,)`: a · sigmoid(b) of the halves."""
    dims = _dims(shape)
    half = dims[-1] // 2
    x = te.placeholder(dims, F32, name="x")
    out = te.compute(dims[:-1] + (half,), lambda *i: x[i] * _sigmoid(x[(*i[:-1], i[-1] + half)]), name="out")
    return _prim([x, out], name)


def depthwise_conv1d(channels: int, kernel: int, name: str) -> tirx.PrimFunc:
    """Buffers: x [T, channels], w [channels, 1, kernel], out [T, channels] (causal: rows before 0
    read zero)."""
    t = _var("T")
    x = te.placeholder((t, channels), F32, name="x")
    w = te.placeholder((channels, 1, kernel), F32, name="w")
    j = te.reduce_axis((0, kernel), name="j")

    def tap(i, c):
        row = i - (kernel - 1) + j
        return tirx.if_then_else(row >= 0, x[_clamp_index(row, t), c], _const(0.0)) * w[c, 0, j]

    out = te.compute((t, channels), lambda i, c: te.sum(tap(i, c), axis=j), name="out")
    return _prim([x, w, out], name)


def rel_positions(count: int, dim: int, name: str) -> tirx.PrimFunc:
    """Buffers: out [count, dim] (no inputs; a constant the lowering may fold): row r holds
    [sin(p·f), cos(p·f)] at p = count - 1 - r, f_i = exp(-i·ln(1e4) / max(dim/2 - 1, 1))."""
    half = dim // 2
    step = _const(-math.log(1e4) / max(half - 1, 1))

    def value(r, d):
        i = tirx.if_then_else(d < half, d, d - half).astype(F32)
        angle = (count - 1 - r).astype(F32) * tirx.exp(i * step)
        return tirx.if_then_else(d < half, tirx.sin(angle), tirx.cos(angle))

    out = te.compute((count, dim), value, name="out")
    return _prim([out], name)


def local_attention(heads: int, head_dim: int, rel_rows: int, chunk: int, context_left: int, context_right: int,
                    softcap: float, invalid_logit: float, name: str) -> tirx.PrimFunc:
    """Buffers: q, k, v [S, heads, head_dim], rel_k [rel_rows, heads, head_dim], out [S, heads, head_dim].

    Query t (block t // chunk, row i = t % chunk) has `width` logits, entry j for key s = t - i + j -
    past. Only visible entries (s in the clip, d = t - s with 0 ≤ d < past or 0 < -d < future) have
    j > i, so transformers' rel_shift reads rel_k row j - i there (zero from rel_rows on); the rest
    are `invalid_logit`, softmax over all `width` entries, keys outside the clip weigh zero rows."""
    s = _var("S")
    past, future = context_left - 1, context_right
    width = chunk + past + future
    q, k, v = (te.placeholder((s, heads, head_dim), F32, name=n) for n in ("q", "k", "v"))
    rel_k = te.placeholder((rel_rows, heads, head_dim), F32, name="rel_k")

    def key(t, j):
        return t - tirx.floormod(t, chunk) + j - past

    def visible(t, j):
        dist = t - key(t, j)
        near = tirx.any(tirx.all(dist >= 0, dist < past), tirx.all(dist < 0, -dist < future))
        return tirx.all(key(t, j) >= 0, key(t, j) < s, near)

    d = te.reduce_axis((0, head_dim), name="d")

    def raw(t, h, j):
        c = j - tirx.floormod(t, chunk)
        kk = tirx.if_then_else(visible(t, j), k[_clamp_index(key(t, j), s), h, d], _const(0.0))
        rr = tirx.if_then_else(tirx.all(c >= 0, c < rel_rows), rel_k[_clamp_index(c, rel_rows), h, d], _const(0.0))
        return te.sum(q[t, h, d] * (kk + rr), axis=d)

    logits = te.compute((s, heads, width), raw, name="raw")
    cap = _const(softcap)
    score = te.compute((s, heads, width), lambda t, h, j: tirx.if_then_else(
        visible(t, j), cap * tirx.tanh(logits[t, h, j] / cap), _const(invalid_logit)), name="score")
    j1 = te.reduce_axis((0, width), name="j1")
    mx = te.compute((s, heads), lambda t, h: te.max(score[t, h, j1], axis=j1), name="mx")
    ex = te.compute((s, heads, width), lambda t, h, j: tirx.exp(score[t, h, j] - mx[t, h]), name="ex")
    j2 = te.reduce_axis((0, width), name="j2")
    den = te.compute((s, heads), lambda t, h: te.sum(ex[t, h, j2], axis=j2), name="den")
    j3 = te.reduce_axis((0, width), name="j3")

    def weighted(t, h, e):
        inside = tirx.all(key(t, j3) >= 0, key(t, j3) < s)
        return ex[t, h, j3] * tirx.if_then_else(inside, v[_clamp_index(key(t, j3), s), h, e], _const(0.0))

    acc = te.compute((s, heads, head_dim), lambda t, h, e: te.sum(weighted(t, h, e), axis=j3), name="acc")
    out = te.compute((s, heads, head_dim), lambda t, h, e: acc[t, h, e] / den[t, h], name="out")
    return _prim([q, k, v, rel_k, out], name)
