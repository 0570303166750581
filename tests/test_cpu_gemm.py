"""The CPU prefill GEMM (`g4c.targets.cpu_gemm`): y = x · Wᵀ for every weight storage, every blocking a
tuner may pick, and token counts around its blocks and panels, against float64 numpy on the weights
as stored (fp16/bf16 rounded, q4/q8 dequantized). Whole models through it: tests/test_parity.py."""

from __future__ import annotations

import numpy as np
import pytest

from g4c.codegen.spec import KernelSpec
from g4c.quant import dequantize, quantize
from g4c.targets import cpu_gemm
from g4c.targets.registry import get_target
from g4c.tuning.tuner import _arguments


def _run(func, args: list[np.ndarray]) -> np.ndarray:
    import tvm

    from g4c.targets.llvm import host_tvm_target

    lib = tvm.compile(tvm.IRModule({"main": func}), target=host_tvm_target())
    tensors = [tvm.runtime.tensor(a, tvm.cpu()) for a in args]
    lib["main"](*tensors)
    return tensors[-1].numpy()


def _weight(storage: str, n: int, k: int, rng) -> tuple[list[np.ndarray], np.ndarray]:
    """(kernel arguments of the weight, its value as float64)."""
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)
    if storage == "float16":
        return [w.astype(np.float16)], w.astype(np.float16).astype(np.float64)
    if storage == "bfloat16":
        bits = (w.view(np.uint32) >> 16).astype(np.uint16)
        return [bits], (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if storage in ("q4", "q8"):
        data, scales = quantize(w, storage, "uint8")
        scales = scales.astype(np.float16)
        return [data, scales], dequantize(data, scales.astype(np.float32), storage).astype(np.float64)
    return [w], w.astype(np.float64)


def _check(storage: str, k: int, n: int, tokens: int, **knobs) -> None:
    rng = np.random.default_rng(k + n + tokens)
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    weight, exact_w = _weight(storage, n, k, rng)
    func = cpu_gemm.linear_kernel(k, n, storage, "main", **knobs)
    y = _run(func, [x, *weight, np.zeros((tokens, n), np.float32)])
    exact = x.astype(np.float64) @ exact_w.T
    # fp32 accumulation of k products: the error of numpy's own fp32 product, with room for the order
    tolerance = max(2 * np.abs(x @ exact_w.T.astype(np.float32) - exact).max(), 1e-5 * np.sqrt(k))
    assert np.abs(y - exact).max() <= tolerance, (storage, k, n, tokens, knobs)


@pytest.mark.parametrize("storage", ["float32", "float16", "bfloat16", "q4", "q8"])
@pytest.mark.parametrize("tokens", [1, 3, 4, 7, 130])  # fewer than a block, blocks + a rest, two panels
def test_gemm_equals_the_product_on_the_stored_weights(storage, tokens):
    _check(storage, 1024, 24, tokens)


@pytest.mark.parametrize("knobs", [
    {"vector": 8, "token_block": 2, "column_block": 8, "token_panel": 64, "k_chunk": 256},
    {"vector": 32, "token_block": 6, "column_block": 2, "token_panel": 256, "k_chunk": 1024},
    {"token_block": 4, "column_block": 3, "token_panel": 10, "k_chunk": 96},  # blocks that divide nothing
])
def test_every_blocking_computes_the_same_product(knobs):
    _check("float32", 1536, 30, 67, **knobs)
    _check("q4", 1536, 30, 67, **knobs)


def test_prefill_linears_are_gemms_and_decode_linears_gemvs():
    """The tuner's spaces follow the kernels: GEMM blocking for prefill, GEMV width/columns for decode."""
    target = get_target("llvm")
    prefill = KernelSpec.of("linear", k=1536, n=256, dtype="float32", rows=None)
    decode = KernelSpec.of("linear", k=1536, n=256, dtype="float32", rows=1)
    assert set(target.knob_space(prefill)) == {"vector", "token_block", "column_block", "token_panel", "k_chunk"}
    assert set(target.knob_space(decode)) == {"vector", "columns"}
    quantized = KernelSpec.of("linear_q", k=1536, n=256, scheme="q4", rows=None)
    args = _arguments(target.unscheduled(quantized), tokens=9, spec=quantized)  # the unscheduled signature
    np.testing.assert_array_equal(_run(target.kernel(quantized, {"token_block": 2}), args),
                                  _run(target.kernel(quantized), [a.copy() for a in args]))


@pytest.mark.parametrize("storage", ["float32", "q4"])
@pytest.mark.parametrize("tokens", [1, 6, 37])  # fewer pairs per expert than a block, blocks + rests
def test_grouped_experts_equal_the_per_token_kernel(storage, tokens):
    """moe_experts_grouped (prefill) computes what moe_experts computes, pair by pair, in the same order."""
    from g4c.codegen import kernels
    from g4c.codegen.kernel_math import quant_word

    hidden, inter, experts, top_k = 96, 64, 8, 3
    rng = np.random.default_rng(tokens)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    idx = np.stack([rng.permutation(experts)[:top_k] for _ in range(tokens)]).astype(np.int64)
    w = rng.random((tokens, top_k)).astype(np.float32)
    gate_up, _ = _weight(storage, experts * 2 * inter, hidden, rng)
    down, _ = _weight(storage, experts * hidden, inter, rng)
    banks = [a.reshape(experts, -1, a.shape[-1]) for a in (*gate_up, *down)]
    args = [x, idx, w, *banks, np.zeros((tokens, hidden), np.float32)]
    with quant_word(*cpu_gemm.CPU_WORDS):
        reference = kernels.moe_experts(hidden, inter, experts, top_k, "main", storage, storage)
    grouped = cpu_gemm.moe_experts_kernel(hidden, inter, experts, top_k, "main", storage, storage)
    expected = _run(reference, [a.copy() for a in args])
    np.testing.assert_allclose(_run(grouped, args), expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
