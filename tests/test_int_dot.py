"""`--quant-dot int8`: quantized linears with int8 activations and integer dot products
(`g4c.codegen.int_dot`, x86 AVX-512 VNNI). The integer arithmetic is exact, so the kernel must equal a
numpy emulation (activations rounded to int8 per group of 32 as llama.cpp's Q8_0, then the dequantized
weights) to fp32 summation order; a whole model's error against the unquantized weights stays within
what the weight quantization alone costs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import PROMPT
from hf_reference import load_reference, reference_logits
from test_quant import dequantized_reference, quant_checkpoints  # noqa: F401 - a fixture

from g4c.compiler import compile_model
from g4c.model import load_model
from g4c.quant import dequantize, quantize
from g4c.runtime import load
from g4c.targets.registry import get_target

pytestmark = pytest.mark.skipif(get_target("llvm").int8_dot is None,
                                reason="this CPU has no AVX-512 VNNI (the int8 path is refused there)")


def int8_activations(x: np.ndarray) -> np.ndarray:
    """x rounded as the kernel rounds it: per group of 32, d = max|x|/127, q = round-half-even(x/d)."""
    groups = x.reshape(*x.shape[:-1], -1, 32)
    d = np.abs(groups).max(axis=-1, keepdims=True) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    return (np.round(groups * inv) * d).reshape(x.shape).astype(np.float32)


def _run(func, args: list[np.ndarray]) -> np.ndarray:
    import tvm

    from g4c.targets.llvm import host_tvm_target

    lib = tvm.compile(tvm.IRModule({"main": func}), target=host_tvm_target())
    tensors = [tvm.runtime.tensor(a, tvm.cpu()) for a in args]
    lib["main"](*tensors)
    return tensors[-1].numpy()


# (k, n): rows of 64, 32 and 16 bytes (the three register widths), row counts that split into tasks of
# 8, 2 and 1 rows; token counts 1 (decode), 5 (a short last token tile) and 8
SHAPES = [("q4", 128, 24), ("q4", 64, 6), ("q4", 32, 5), ("q4", 1536, 40), ("q8", 64, 16), ("q8", 32, 3),
          ("q8", 96, 8)]


@pytest.mark.parametrize("scheme, k, n", SHAPES)
@pytest.mark.parametrize("tokens", [1, 5, 8])
def test_kernel_is_its_integer_arithmetic(scheme, k, n, tokens):
    from g4c.codegen.int_dot import linear_qdot
    from g4c.codegen.kernel_math import quant_word

    rng = np.random.default_rng(k * n + tokens)
    data, scales = quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.1, scheme, "uint8")
    scales = scales.astype(np.float16)  # as CPUs store them
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    if x.size > 32:
        x[0, :32] = 0.0  # an all-zero activation group (scale 0)
    x[-1, -32] *= 1e3  # a group dominated by one large value
    with quant_word("uint8", "float16"):
        func = linear_qdot(k, n, scheme, "qdot", rows=1 if tokens == 1 else None)
    got = _run(func, [x, data, scales, np.zeros((tokens, n), np.float32)])
    weights = dequantize(data, scales, scheme).astype(np.float64)
    expected = int8_activations(x).astype(np.float64) @ weights.T
    exact = x.astype(np.float64) @ weights.T
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 2e-6 * scale * np.sqrt(k / 32)
    assert np.abs(got - exact).max() > 1e-5 * scale  # the activations really were rounded


@pytest.fixture(scope="module")
def int8_artifacts(quant_checkpoints, tmp_path_factory):  # noqa: F811 - the imported fixture
    root = tmp_path_factory.mktemp("int8")
    out = {}
    for family, scheme in (("e", "q4"), ("dense", "q8"), ("moe", "q4")):
        loaded = load_model(str(quant_checkpoints[family]))
        out[family] = compile_model(loaded.cfg, loaded.weights, "llvm", root / family, quant=scheme,
                                    quant_ple=scheme, quant_dot="int8")
    return out


@pytest.mark.parametrize("family", ["e", "dense", "moe"])
def test_model_error_is_bounded_by_the_weight_rounding(family, int8_artifacts, quant_checkpoints, tmp_path):  # noqa: F811
    """Every quantized linear runs `linear_qdot`; the logits differ from the dequantized weights' (the
    activation rounding) by less than those differ from the unquantized model's (the weight rounding)."""
    art = int8_artifacts[family]
    ops = {spec["op"] for spec in json.loads((art / "manifest.json").read_text())["kernels"].values()}
    assert "linear_qdot" in ops and not {"linear", "linear_q", "moe_experts"} & ops
    assert ("moe_experts_qdot" in ops) == (family == "moe")
    logits = load(art, prefill_chunk=7).prefill(PROMPT, all_logits=True)
    dequantized = reference_logits(dequantized_reference(quant_checkpoints[family], art, tmp_path), PROMPT)
    exact = reference_logits(load_reference(quant_checkpoints[family]), PROMPT)
    activation_error = np.abs(logits - dequantized).max()
    assert 1e-4 < activation_error < np.abs(dequantized - exact).max()


def test_int8_dot_is_refused_where_the_target_has_none(tmp_path, capsys):
    from g4c.cli import main

    out = tmp_path / "arm"
    for args, message in ((["--target", "arm", "--quant-dot", "int8"], "has no integer dot-product kernels"),
                          (["--quant-dot", "int4"], "unknown --quant-dot 'int4'")):
        code = main(["compile", "tiny-e", "--random-weights", "--quant", "q4", "-o", str(out), *args])
        err = capsys.readouterr().err.strip()
        assert code != 0 and message in err and len(err.splitlines()) == 1, err
        assert not out.exists()


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize("scheme", ["q4", "q8"])
@pytest.mark.parametrize("tokens", [1, 6])
def test_moe_kernel_is_its_integer_arithmetic(scheme, tokens):
    """The expert kernel: x rounded to int8 for gate/up, the activated rows rounded again for down."""
    from g4c.codegen.int_dot import moe_experts_qdot
    from g4c.codegen.kernel_math import quant_word

    hidden, inter, experts, top_k = 128, 96, 4, 2
    rng = np.random.default_rng(7 + tokens)
    banks = {}
    for bank, shape in (("gate_up", (experts, 2 * inter, hidden)), ("down", (experts, hidden, inter))):
        data, scales = quantize(rng.standard_normal(shape).astype(np.float32) * 0.1, scheme, "uint8")
        banks[bank] = (data, scales.astype(np.float16), dequantize(data, scales, scheme).astype(np.float64))
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    idx = np.stack([rng.permutation(experts)[:top_k] for _ in range(tokens)]).astype(np.int64)
    w = rng.random((tokens, top_k)).astype(np.float32)
    with quant_word("uint8", "float16"):
        func = moe_experts_qdot(hidden, inter, experts, top_k, "moe", scheme, scheme)
    got = _run(func, [x, idx, w, *banks["gate_up"][:2], *banks["down"][:2], np.zeros((tokens, hidden), np.float32)])

    def reference(round_activations):
        out = np.zeros((tokens, hidden))
        xs = int8_activations(x) if round_activations else x
        for i in range(tokens):
            for j in range(top_k):
                e = idx[i, j]
                h = banks["gate_up"][2][e] @ xs[i].astype(np.float64)
                act = (_gelu(h[:inter]) * h[inter:] * w[i, j]).astype(np.float32)
                act = int8_activations(act[None])[0] if round_activations else act
                out[i] += banks["down"][2][e] @ act.astype(np.float64)
        return out

    expected, exact = reference(True), reference(False)
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-4 * scale
    assert np.abs(got - exact).max() > 1e-4 * scale  # the activations really were rounded
