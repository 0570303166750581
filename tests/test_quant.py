"""Group-quantized weights (`--quant q8|q4`: linear and embedding matrices, MoE expert banks): llama.cpp's
Q8_0/Q4_0 blocks bit for bit, kernels that compute exactly on the dequantized weights (checked against transformers running those weights in
fp32), on the CPU and on Vulkan, and an error no larger than round-to-nearest quantization's."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import PROMPT
from hf_reference import FAMILIES, UNIFIED, hf_config, load_reference, make_checkpoint, reference_greedy, reference_logits

from g4c.compiler import compile_model
from g4c.model import load_model
from g4c.quant import dequantize, quantize
from g4c.runtime import load


@pytest.mark.parametrize("scheme, ggml", [("q4", "Q4_0"), ("q8", "Q8_0")])
def test_blocks_are_llama_cpp_blocks(scheme, ggml):
    """quantize + dequantize gives exactly what gguf's reference Q4_0/Q8_0 quantizer gives."""
    from gguf import GGMLQuantizationType, quants

    w = np.random.default_rng(0).standard_normal((48, 256)).astype(np.float32) * 0.05
    w[3, :32] = 0.0  # an all-zero block
    kind = GGMLQuantizationType[ggml]
    expected = quants.dequantize(quants.quantize(w, kind), kind)
    assert np.array_equal(dequantize(*quantize(w, scheme), scheme), expected)


def _leaves(name: str, recipes: dict) -> list[str]:
    recipe = recipes.get(name, {})
    if "concat" in recipe:
        return [leaf for part in recipe["concat"] for leaf in _leaves(part, recipes)]
    if "rows" in recipe:
        return _leaves(recipe["rows"][0], recipes)
    return [name]


def quantized_tensors(manifest: dict) -> dict[str, str]:
    """checkpoint tensor (g4c name) → the scheme the artifact stores it in: the leaves of every
    quantized weight (packed, sliced), the expert banks included, and the quantized host tables."""
    recipes = manifest["weight_recipes"]
    quantized = {leaf: r["quant"][1] for r in recipes.values() if "quant" in r
                 for leaf in _leaves(r["quant"][0], recipes)}
    quantized.update({t: manifest["host_quant"] for t in manifest["host_tables"] if manifest["host_quant"]})
    return quantized


def dequantized_reference(checkpoint, artifact, tmp_path):
    """transformers with the artifact's quantized tensors replaced by their dequantized values (the
    exact weights the kernels compute with), in fp32: matrices [N, K] and expert banks [E, N, K]
    (`model.layers.N.experts.gate_up_proj` / `down_proj` in transformers, `layers.N.experts.…` in g4c),
    quantized along their last axis."""
    quantized = quantized_tensors(json.loads((artifact / "manifest.json").read_text()))
    model = load_reference(checkpoint)
    state = model.state_dict()
    done = set()
    with torch.no_grad():
        for key, tensor in state.items():
            name = next((n for n in quantized if key.endswith(n)), None)  # g4c names are HF keys' suffixes
            if name is not None:
                scheme = quantized[name]
                tensor.copy_(torch.from_numpy(dequantize(*quantize(tensor.numpy(), scheme), scheme)))
                done.add(name)
    assert done == set(quantized), set(quantized) - done
    return model


# The test families with widths that are whole groups of 32, so that every matrix is quantized
WIDE = {"hidden_size": 64, "head_dim": 32, "global_head_dim": 64}
QUANT_FAMILIES = {
    "e": (dict(FAMILIES["e"], **WIDE, intermediate_size=64, hidden_size_per_layer_input=32, vocab_size=1024,
               vocab_size_per_layer_input=1024), False),
    "moe": (dict(FAMILIES["moe"], **WIDE, intermediate_size=64, moe_intermediate_size=32), False),
    "dense": (dict(FAMILIES["dense"], **WIDE, intermediate_size=96), False),
    "unified": (dict(UNIFIED, **WIDE), True),
}
CASES = [("e", "q8"), ("e", "q4"), ("moe", "q4"), ("dense", "q8"), ("unified", "q4")]


@pytest.fixture(scope="module")
def quant_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-ckpt")
    return {name: make_checkpoint(root / name, hf_config(kwargs, unified), seed=20 + i)
            for i, (name, (kwargs, unified)) in enumerate(QUANT_FAMILIES.items())}


@pytest.fixture(scope="module")
def quant_artifacts(quant_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    out = {}
    for family, scheme in CASES:
        loaded = load_model(str(quant_checkpoints[family]))
        out[family, scheme] = compile_model(loaded.cfg, loaded.weights, "llvm", root / f"{family}-{scheme}",
                                            quant=scheme, quant_ple=scheme)
    return out


@pytest.mark.parametrize("family, scheme", CASES)
def test_quantized_artifact_is_exact_on_its_dequantized_weights(family, scheme, quant_artifacts, quant_checkpoints,
                                                                 tmp_path):
    art = quant_artifacts[family, scheme]
    manifest = json.loads((art / "manifest.json").read_text())
    ops = {spec["op"] for spec in manifest["kernels"].values()}
    assert {"linear_q", "embed_q"} <= ops and "linear" not in ops and manifest["quant"] == scheme
    assert manifest["host_quant"] == (scheme if family == "e" else None)  # the PLE table
    if family == "moe":
        _assert_expert_banks_quantized(manifest, scheme, ["moe_experts"])
    reference = dequantized_reference(quant_checkpoints[family], art, tmp_path)
    logits = load(art, prefill_chunk=7).prefill(PROMPT, all_logits=True)
    expected = reference_logits(reference, PROMPT)
    assert np.abs(logits - expected).max() <= 1e-4
    assert load(art).generate(PROMPT[:6], 16) == reference_greedy(reference, PROMPT[:6], 16)
    # the error against the unquantized model is round-to-nearest's (same weights), no more
    exact = reference_logits(load_reference(quant_checkpoints[family]), PROMPT)
    assert np.abs(logits - exact).max() <= np.abs(expected - exact).max() + 1e-4


def _assert_expert_banks_quantized(manifest: dict, scheme: str, ops: list[str]) -> None:
    """Every layer's expert banks are stored quantized (recipes with "quant", never the float bank) and
    each expert kernel (`ops`) reads them in that scheme."""
    layers = manifest["config"]["num_hidden_layers"]
    banks = {f"layers.{i}.experts.{bank}" for i in range(layers) for bank in ("gate_up_proj", "down_proj")}
    assert {n for n in quantized_tensors(manifest) if ".experts." in n} == banks
    assert not banks & set(manifest["entry"]["weights"])
    specs = [spec for spec in manifest["kernels"].values() if spec["op"] in ops]
    assert {spec["op"] for spec in specs} == set(ops)
    for spec in specs:
        assert {v for k, v in spec.items() if k.endswith("storage")} == {scheme}, spec


def test_quantized_weights_are_smaller(quant_artifacts, quant_checkpoints, tmp_path):
    loaded = load_model(str(quant_checkpoints["e"]))
    fp32 = compile_model(loaded.cfg, loaded.weights, "llvm", tmp_path / "fp32")
    size = {s: sum(f.stat().st_size for f in quant_artifacts["e", s].glob("*.safetensors")) for s in ("q8", "q4")}
    assert size["q4"] < size["q8"] < 0.6 * sum(f.stat().st_size for f in fp32.glob("*.safetensors"))


@pytest.mark.parametrize("family", ["e", "moe"])
def test_vulkan_quantized_kernels_are_exact(family, quant_checkpoints, tmp_path, monkeypatch):
    """The same on Vulkan (lavapipe): e with the embedding table split into quantized row slices; moe
    with q4 expert banks through the grouped GEMMs (a 20-token prefill) and the decode kernels."""
    from g4c.targets import vulkan

    monkeypatch.setitem(vulkan.PROFILES, "generic", vulkan.VulkanProfile(threads=256, fp16=False,
                                                                         max_binding=16 << 10))
    loaded = load_model(str(quant_checkpoints[family]))
    art = compile_model(loaded.cfg, loaded.weights, "vulkan", tmp_path / "vk", quant="q4", quant_ple="q4")
    manifest = json.loads((art / "manifest.json").read_text())
    ops = {spec["op"] for spec in manifest["kernels"].values()}
    assert "linear_q" in ops and "linear" not in ops
    if family == "e":  # the table is split, its slices stay quantized
        assert any(k["op"] == "embed_rows" and k["storage"] == "q4" for k in manifest["kernels"].values())
    else:
        _assert_expert_banks_quantized(manifest, "q4", ["moe_gate_up", "moe_down", "moe_gate_up_grouped",
                                                         "moe_down_grouped"])
    reference = dequantized_reference(quant_checkpoints[family], art, tmp_path)
    session = load(art, prefill_chunk=7) if family == "e" else load(art)  # moe: the prompt in one chunk
    expected = reference_logits(reference, PROMPT)
    assert np.abs(session.prefill(PROMPT, all_logits=True) - expected).max() <= 1e-4
    session.reset()
    session.prefill(PROMPT[:10])
    decoded = np.stack([session.decode(token) for token in PROMPT[10:16]])  # the decode kernels' logits
    assert np.abs(decoded - expected[10:16]).max() <= 1e-4
    session.reset()
    assert session.generate(PROMPT[:6], 12) == reference_greedy(reference, PROMPT[:6], 12)


def test_seeded_quantized_artifact_matches_the_written_one(tmp_path):
    from g4c.cli import main

    common = ["compile", "tiny-e", "--random-weights", "--seed", "2", "--quant", "q4", "--no-check"]
    assert main(common + ["-o", str(tmp_path / "full")]) == 0
    assert main(common + ["--weights-from-seed", "-o", str(tmp_path / "seed")]) == 0
    prompt = [2, 17, 99, 5, 8]
    assert np.array_equal(load(tmp_path / "full").prefill(prompt, all_logits=True),
                          load(tmp_path / "seed").prefill(prompt, all_logits=True))


def test_unknown_quantization_is_one_line_before_any_work(tmp_path):
    result = subprocess.run([sys.executable, "-m", "g4c.cli", "compile", "tiny-e", "--random-weights", "--quant",
                             "q3", "-o", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "unknown quantization 'q3'" in result.stderr
    assert not (tmp_path / "x").exists()


class NativeBlocks:
    """A checkpoint whose 2-D matrices are stored as q4 blocks that round-to-nearest would not produce
    (no code is −8, so requantizing their values picks other scales): compiling must use them as they
    are."""

    def __init__(self, source):
        self.source = source

    def __getattr__(self, name):
        return getattr(self.source, name)

    def quantized(self, name: str):
        shape = self.source.shape(name)
        if len(shape) != 2 or shape[-1] % 32:
            return None
        data, scales = quantize(self.source.get(name), "q4")
        raw = data.view(np.uint8)
        low, high = raw & 15, raw >> 4
        low[low == 0], high[high == 0] = 1, 1  # code −8 → −7
        return "q4", (low | (high << 4)).view(np.uint32), scales

    def get(self, name: str):  # what a reader of such a file gets: the dequantized blocks
        stored = self.quantized(name)
        return self.source.get(name) if stored is None else dequantize(stored[1], stored[2], "q4")


def test_stored_blocks_compile_as_they_are(quant_checkpoints, tmp_path):
    """Tensors a checkpoint already stores quantized (a GGUF's Q4_0) are compiled without requantizing,
    whatever --quant says: exact against transformers on the stored blocks' values."""
    from g4c.weights import Weights

    loaded = load_model(str(quant_checkpoints["dense"]))
    source = NativeBlocks(loaded.weights.source)
    art = compile_model(loaded.cfg, Weights(loaded.cfg, source), "llvm", tmp_path / "native")
    assert json.loads((art / "manifest.json").read_text())["quant"] is None  # no --quant: only the stored blocks
    model = load_reference(quant_checkpoints["dense"])
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            name = next((n for n in source.names() if key.endswith(n)), None)
            if name is not None and source.quantized(name) is not None:
                tensor.copy_(torch.from_numpy(source.get(name)))
    logits = load(art, prefill_chunk=7).prefill(PROMPT, all_logits=True)
    assert np.abs(logits - reference_logits(model, PROMPT)).max() <= 1e-4


def test_q3_blocks_hold_eight_levels_per_group():
    """q3 (host tables only): 12 bytes of 3-bit values + one fp16-valued scale per 32 weights; value e in
    bits 3e..3e+2 of its group (little-endian), w = (q − 4)·scale with scale = m / −4 (Q4_0's rule)."""
    from g4c.quant import packed_shapes

    w = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)
    data, scales = quantize(w, "q3", "uint8")
    assert data.shape == packed_shapes(w.shape, "q3", "uint8")[0] == (5, 24)
    bits = int.from_bytes(data[2, 12:24].tobytes(), "little")  # row 2, group 1, decoded independently
    q = np.array([(bits >> (3 * e)) & 7 for e in range(32)], np.float32)
    assert np.array_equal(dequantize(data, scales, "q3")[2, 32:], (q - 4) * scales[2, 1])
    err = np.abs(dequantize(data, scales, "q3") - w).reshape(5, 2, 32).max(axis=-1)
    # round to nearest of 8 levels; a value opposite in sign to m beyond the top level (+3) is clipped: ≤ one step
    assert np.all(err <= np.abs(scales) + 1e-6)


def test_q3_ple_table_is_exact_and_refused_for_kernels(quant_checkpoints, tmp_path, capsys):
    from g4c.cli import main

    loaded = load_model(str(quant_checkpoints["e"]))
    art = compile_model(loaded.cfg, loaded.weights, "llvm", tmp_path / "q3", quant="q4", quant_ple="q3")
    assert json.loads((art / "manifest.json").read_text())["host_quant"] == "q3"
    reference = dequantized_reference(quant_checkpoints["e"], art, tmp_path)
    assert np.abs(load(art).prefill(PROMPT, all_logits=True) - reference_logits(reference, PROMPT)).max() <= 1e-4
    capsys.readouterr()  # transformers' loading bars
    code = main(["compile", str(quant_checkpoints["e"]), "--quant", "q3", "-o", str(tmp_path / "no")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "q3 is for the PLE table only" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "no").exists()
