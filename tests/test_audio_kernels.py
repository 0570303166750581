"""The audio tower's TensorIR kernels (`g4c.codegen.audio_kernels`), built for the host with
`tvm.compile(target="llvm")`, against the interpreter's op on random data, at several row counts
(one build serves them all: the row counts are symbolic)."""

from __future__ import annotations

import numpy as np
import pytest

from g4c.codegen import audio_kernels as ak
from g4c.ir.interpreter import KERNELS

TOL = dict(rtol=1e-5, atol=1e-5)


def _build(func):
    import tvm

    return tvm.compile(tvm.IRModule({"main": func}), target="llvm")["main"]


def _run(kernel, args: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
    import tvm

    # np.array, not np.ascontiguousarray, which turns the 0-d clamp bounds into 1-d arrays
    tensors = [tvm.runtime.tensor(np.array(a, order="C"), tvm.cpu()) for a in args]
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32), tvm.cpu())
    kernel(*tensors, out)
    return out.numpy()


def _rand(rng, *shape, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("freq, cin, cout", [(8, 1, 6), (4, 6, 3), (7, 2, 5)])
def test_conv2d(freq, cin, cout):
    kernel = _build(ak.conv2d(freq, cin, cout, kernel=3, stride=2, padding=1, name="conv2d"))
    rng = np.random.default_rng(freq)
    w = _rand(rng, cout, cin, 3, 3)
    for t in (1, 2, 9, 24):
        x, rows = _rand(rng, t, freq, cin), np.arange((t - 1) // 2 + 1)
        expected = KERNELS["conv2d"](x, w, rows, stride=2, padding=1)
        np.testing.assert_allclose(_run(kernel, [x, w], expected.shape), expected, **TOL)


@pytest.mark.parametrize("shape", [("T", 4, 8), ("T", 32)])
def test_layer_norm(shape):
    kernel = _build(ak.layer_norm(shape, eps=1e-3, name="layer_norm"))
    rng = np.random.default_rng(len(shape))
    w = _rand(rng, shape[-1])
    for t in (1, 5, 13):
        x = _rand(rng, t, *shape[1:], scale=3.0) + 1.0
        expected = KERNELS["layer_norm"](x, w, eps=1e-3)
        np.testing.assert_allclose(_run(kernel, [x, w], expected.shape), expected, **TOL)


@pytest.mark.parametrize("op", ["relu", "silu", "softplus"])
@pytest.mark.parametrize("shape", [("T", 3, 4), (8,)])
def test_unary(op, shape):
    kernel = _build(getattr(ak, op)(shape, name=op))
    rng = np.random.default_rng(0)
    for t in (1, 6):
        x = _rand(rng, *[t if isinstance(d, str) else d for d in shape], scale=20.0)
        x.flat[:2] = (-200.0, 200.0)  # far past exp's fp32 range
        np.testing.assert_allclose(_run(kernel, [x], x.shape), KERNELS[op](x), **TOL)


def test_clip_and_clamp():
    rng = np.random.default_rng(1)
    clip, clamp = _build(ak.clip(("T", 16), limit=0.7, name="clip")), _build(ak.clamp(("T", 16), name="clamp"))
    bounds = [(np.float32(-0.5), np.float32(0.3)), (np.float32(-np.inf), np.float32(np.inf))]
    for t in (1, 7):
        x = _rand(rng, t, 16)
        np.testing.assert_allclose(_run(clip, [x], x.shape), KERNELS["clip"](x, limit=0.7), **TOL)
        for lo, hi in bounds:
            lo_a, hi_a = np.array(lo), np.array(hi)
            np.testing.assert_allclose(_run(clamp, [x, lo_a, hi_a], x.shape), KERNELS["clamp"](x, lo_a, hi_a), **TOL)


def test_glu():
    kernel = _build(ak.glu(("T", 12), name="glu"))
    rng = np.random.default_rng(2)
    for t in (1, 9):
        x = _rand(rng, t, 12, scale=10.0)
        np.testing.assert_allclose(_run(kernel, [x], (t, 6)), KERNELS["glu"](x), **TOL)


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_depthwise_conv1d(kernel_size):
    kernel = _build(ak.depthwise_conv1d(16, kernel_size, name="dwconv"))
    rng = np.random.default_rng(kernel_size)
    w = _rand(rng, 16, 1, kernel_size)
    for t in (1, 3, 11):
        x = _rand(rng, t, 16)
        np.testing.assert_allclose(_run(kernel, [x, w], x.shape), KERNELS["depthwise_conv1d"](x, w), **TOL)


@pytest.mark.parametrize("count, dim", [(5, 32), (13, 1024), (3, 2)])
def test_rel_positions(count, dim):
    kernel = _build(ak.rel_positions(count, dim, name="rel_positions"))
    expected = KERNELS["rel_positions"](count=count, dim=dim)
    np.testing.assert_allclose(_run(kernel, [], expected.shape), expected, **TOL)


@pytest.mark.parametrize("chunk, left, right", [(4, 5, 0), (4, 5, 2), (3, 2, 0), (12, 13, 0), (2, 1, 0), (3, 4, 5)])
def test_local_attention(chunk, left, right):
    heads, head_dim = 3, 8
    width = chunk + left - 1 + right
    rel_rows = width // 2 + 1
    attrs = dict(chunk=chunk, context_left=left, context_right=right, softcap=5.0, invalid_logit=-1e9)
    kernel = _build(ak.local_attention(heads, head_dim, rel_rows, name="local_attention", **attrs))
    rng = np.random.default_rng(chunk * 100 + left * 10 + right)
    rel_k = _rand(rng, rel_rows, heads, head_dim)
    for s in (1, chunk, 2 * chunk + 1, 17):
        q, k, v = (_rand(rng, s, heads, head_dim) for _ in range(3))
        expected = KERNELS["local_attention"](q, k, v, rel_k, **attrs)
        np.testing.assert_allclose(_run(kernel, [q, k, v, rel_k], q.shape), expected, **TOL)
