"""compressed-tensors checkpoints (pack-quantized int4/int8, as vLLM reads them and Google's QAT releases
ship Gemma 4), written here by the compressed-tensors package itself, compile as they are stored: the
artifact's q4/q8 blocks are the file's codes repacked (no requantization), and its logits match
transformers running the checkpoint through compressed-tensors' own dequantization, in fp32."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("compressed_tensors")

import torch  # noqa: E402
from compressed_tensors.compressors import BaseCompressor, ModelCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,  # noqa: E402
                                             apply_quantization_config)
from compressed_tensors.quantization.quant_metadata import QuantizationMetadata  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402
from conftest import PROMPT  # noqa: E402
from hf_reference import FAMILIES, hf_config, randomize_, reference_greedy, reference_logits  # noqa: E402
from safetensors import safe_open  # noqa: E402
from test_quant import QUANT_FAMILIES, _leaves  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402

from g4c.compiler import compile_model  # noqa: E402
from g4c.compressed_tensors import CompressedTensorsCheckpoint, CompressedTensorsError  # noqa: E402
from g4c.errors import G4CError  # noqa: E402
from g4c.model import load_model  # noqa: E402
from g4c.quant import dequantize, packed_shapes, quantize  # noqa: E402
from g4c.runtime import load  # noqa: E402
from g4c.weights import expected_shapes  # noqa: E402

# transformers warns that the checkpoint's own quantization_config is used beside dequantize=True
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")

INT4 = dict(num_bits=4, type="int", symmetric=True, strategy="group")
INT8 = dict(num_bits=8, type="int", symmetric=True, strategy="group")
# A dense model whose every reduction width is a multiple of 128 (hidden 128, 4 heads of 32 / 64)
# and an LM head of its own (compressing a tied embedding unties it: transformers then saves both)
DENSE128 = dict(FAMILIES["dense"], hidden_size=128, head_dim=32, global_head_dim=64, intermediate_size=128,
                tie_word_embeddings=False)
CASES = {
    # E-type (PLE, KV sharing, double-wide MLP), fp32: every Linear int4 in groups of 32, the scales fp16
    # values (compressed-tensors' scale_dtype; stored as fp32)
    "e": (QUANT_FAMILIES["e"][0], {"group_0": (["Linear"], dict(INT4, group_size=32, scale_dtype=torch.float16))},
          dict(dtype=torch.float32)),
    # dense, bf16 like Google's QAT releases (bf16 scales): int4 in groups of 128 (each scale repeated over
    # 4 g4c groups), the o projections int4 in groups of 32 and the down projections int8 (a regex target
    # wins over the class target), the LM head int4 in groups of 128, the embedding int4 in groups of 64
    "dense": (DENSE128, {"group_0": (["Linear"], dict(INT4, group_size=128)),
                         "group_1": ([r"re:.*self_attn\.o_proj$"], dict(INT4, group_size=32)),
                         "group_2": ([r"re:.*mlp\.down_proj$"], dict(INT8, group_size=128)),
                         "group_3": (["Embedding"], dict(INT4, group_size=64))},
              dict(dtype=torch.bfloat16, ignore=())),
}


def calibrate_(model) -> None:
    """Min/max weight scales (and zero points) for every module compressed-tensors set up, as
    llm-compressor's default observer computes them."""
    with torch.no_grad():
        for module in model.modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None or scheme.weights is None:
                continue
            args, w = scheme.weights, module.weight
            if args.strategy == "group":
                w = w.unflatten(-1, (-1, args.group_size))
                low, high = w.amin(-1), w.amax(-1)
            elif args.strategy == "channel":
                low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            else:
                low, high = w.amin().reshape(1), w.amax().reshape(1)
            scale, zero_point = calculate_qparams(low, high, args)
            module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.copy_(zero_point.reshape(module.weight_zero_point.shape))


def write_compressed(directory: Path, kwargs: dict, groups: dict, seed: int, ignore=("lm_head",),
                     dtype=torch.float32, fmt: str | None = None, **scheme_extra) -> Path:
    """A random transformers checkpoint quantized and saved by compressed-tensors (ModelCompressor):
    config_groups {name: (targets, weight args)}."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kwargs), dtype=dtype)
    randomize_(model, seed)
    config = QuantizationConfig(config_groups={
        name: QuantizationScheme(targets=targets, weights=QuantizationArgs(**args), **scheme_extra)
        for name, (targets, args) in groups.items()}, ignore=list(ignore))
    apply_quantization_config(model, config, show_progress=False)
    calibrate_(model)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(directory)
    compressor.update_config(directory)
    return directory


def load_dequantized(directory: Path):
    """transformers loading the checkpoint with compressed-tensors dequantizing it (`dequantize=True`),
    in fp32. transformers 5 decompresses every dense module with one config group, so this reference
    only serves single-group checkpoints; `ct_reference` serves all."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager",
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    return model.eval()


def ct_reference(directory: Path):
    """transformers (fp32) on the checkpoint's weights as compressed-tensors reads them: its
    `apply_quantization_config` gives each module its config group (exact names, then regexes, then
    classes: as vLLM resolves them) and that group's compressor dequantizes the module's tensors, in
    fp32 (it computes q·scale in the scales' dtype, which would round the products of bf16 scales)."""
    raw = json.loads((directory / "config.json").read_text())["quantization_config"]
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), dtype=torch.float32,
                                             attn_implementation="eager")
    config = QuantizationConfig.model_validate(raw)
    apply_quantization_config(model, config, show_progress=False)
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    with torch.no_grad():
        for name, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None:
                continue
            params = {p: tensors.pop(f"{name}.{p}") for p in ("weight", "weight_packed", "weight_scale", "weight_shape")
                      if f"{name}.{p}" in tensors}
            params["weight_scale"] = params["weight_scale"].float()  # q·scale in fp32: exact for bf16 scales
            compressor = BaseCompressor.get_value_from_registry(scheme.format or config.format)
            weight = compressor.decompress(params, scheme)["weight"]
            QuantizationMetadata.clear_quantization(module)  # a plain Linear again
            module.weight.copy_(weight)
        for key in [k for k in tensors if k.endswith(".embed_scale")]:  # a compressed Embedding saves its
            saved = tensors.pop(key)  # non-persistent buffer (sqrt(width) in the model's dtype) too
            assert torch.equal(saved, model.get_buffer(key).to(saved.dtype))
        _, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected, unexpected
    return model.eval()


def hf_module(name: str) -> str:
    """The checkpoint's module of a g4c tensor name (`layers.0.mlp.up_proj.weight` → `model.layers.0.mlp.up_proj`)."""
    module = name.removesuffix(".weight")
    return module if module == "lm_head" else f"model.{module}"


def file_blocks(directory: Path, name: str) -> tuple[str, np.ndarray, np.ndarray]:
    """(scheme, data bytes, scales) of a g4c tensor repacked from the file independently of g4c:
    compressed-tensors' `unpack_from_int32`, then Q4_0's byte layout (or int8 bytes)."""
    module = hf_module(name)
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        packed, shape = f.get_tensor(f"{module}.weight_packed"), f.get_tensor(f"{module}.weight_shape")
        scale = f.get_tensor(f"{module}.weight_scale")
    rows, cols = shape.tolist()
    bits = packed.shape[1] * 32 // cols
    codes = unpack_from_int32(packed, bits, torch.Size([rows, cols]))
    scales = scale.float().repeat_interleave(cols // scale.shape[1] // 32, dim=1).numpy()
    if bits == 4:
        nibbles = (codes.to(torch.int16) + 8).to(torch.uint8).reshape(rows, -1, 32)
        data = (nibbles[..., :16] | (nibbles[..., 16:] << 4)).reshape(rows, -1)
        return "q4", data.numpy(), scales
    return "q8", codes.view(torch.uint8).numpy(), scales


@pytest.fixture(scope="module")
def ct_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct-ckpt")
    return {name: write_compressed(root / name, kwargs, groups, seed=40 + i, **options)
            for i, (name, (kwargs, groups, options)) in enumerate(CASES.items())}


@pytest.fixture(scope="module")
def ct_artifacts(ct_checkpoints, tmp_path_factory):
    """Each checkpoint compiled for the host: e by the command line (`g4c compile DIR -o OUT`), dense by
    `compile_model`."""
    from g4c.cli import main

    root = tmp_path_factory.mktemp("ct")
    assert main(["compile", str(ct_checkpoints["e"]), "-o", str(root / "e"), "--no-check"]) == 0
    loaded = load_model(str(ct_checkpoints["dense"]))
    return {"e": root / "e", "dense": compile_model(loaded.cfg, loaded.weights, "llvm", root / "dense")}


@pytest.fixture(scope="module")
def ct_references(ct_checkpoints):
    return {family: ct_reference(path) for family, path in ct_checkpoints.items()}


def _bound(reference, ids: list[int]) -> tuple[np.ndarray, float]:
    """transformers' fp32 logits and the tolerance: max(1e-4, 2 × its own error against float64)."""
    logits = reference_logits(reference, ids)
    fp64 = copy.deepcopy(reference).double()
    if getattr(reference.config, "enable_moe_block", False):
        fp64.set_experts_implementation("eager")  # torch's grouped GEMM has no float64
    with torch.no_grad():
        exact = fp64(torch.tensor([ids]), output_hidden_states=True).logits[0].numpy()
    error = float(np.abs(logits - exact).max())
    print(f"transformers fp32 vs float64: max|Δlogits| {error:.3g}")
    return logits, max(1e-4, 2 * error)


def test_tensors_are_compressed_tensors_values(ct_checkpoints, ct_references):
    """Every quantized tensor reads back as compressed-tensors dequantizes it (bit for bit), its q4/q8
    blocks are the file's codes in g4c's layout, and the float tensors are the file's."""
    path = ct_checkpoints["dense"]
    source = CompressedTensorsCheckpoint(path)
    state = ct_references["dense"].state_dict()
    schemes = {}
    for name in source.names():
        key = name if name == "lm_head.weight" else f"model.{name}"
        assert np.array_equal(np.asarray(source.get(name), np.float32), state[key].numpy()), name
        stored = source.quantized(name)
        if stored is None:
            assert source.quantized_scheme(name) is None
            continue
        scheme, data, scales = stored
        schemes[name] = scheme
        assert scheme == source.quantized_scheme(name) and data.dtype == np.uint32 and scales.dtype == np.float32
        assert (data.shape, scales.shape) == packed_shapes(source.shape(name), scheme)
        expected = file_blocks(path, name)
        assert scheme == expected[0] and np.array_equal(data.view(np.uint8), expected[1])
        assert np.array_equal(scales, expected[2])
        assert np.array_equal(dequantize(data, scales, scheme), source.get(name))
    assert schemes["layers.0.mlp.down_proj.weight"] == "q8" and schemes["layers.0.self_attn.o_proj.weight"] == "q4"
    assert {schemes[n] for n in ("layers.1.mlp.gate_proj.weight", "embed_tokens.weight", "lm_head.weight")} == {"q4"}
    ids = np.array([5, 0, 5, 127])
    for name in ("layers.0.mlp.down_proj.weight", "embed_tokens.weight"):  # row gathers read only those rows
        assert np.array_equal(source.rows(name, ids), source.get(name)[ids])


def test_transformers_loader_agrees(ct_checkpoints, ct_references):
    """transformers' own loader (`dequantize=True`) gives the same weights for the single-group
    checkpoint, so `ct_reference` is what transformers runs."""
    ours = ct_references["e"].state_dict()
    theirs = load_dequantized(ct_checkpoints["e"]).state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("family", list(CASES))
def test_compiled_int4_checkpoint_matches_transformers(family, ct_artifacts, ct_references, ct_checkpoints):
    art = ct_artifacts[family]
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["quant"] is None  # no --quant: only the stored blocks are quantized
    ops = {spec["op"] for spec in manifest["kernels"].values()}
    assert "linear_q" in ops and ("embed_q" in ops) == (family == "dense")  # dense: its embedding is int4
    reference = ct_references[family]
    expected, bound = _bound(reference, PROMPT)
    logits = load(art, prefill_chunk=7).prefill(PROMPT, all_logits=True)
    delta = float(np.abs(logits - expected).max())
    print(f"{family}: max|Δlogits| {delta:.3g} (bound {bound:.3g})")
    assert delta <= bound
    assert load(art).generate(PROMPT[:6], 16) == reference_greedy(reference, PROMPT[:6], 16)


@pytest.mark.parametrize("family", list(CASES))
def test_artifact_holds_the_stored_blocks(family, ct_artifacts, ct_checkpoints):
    """The artifact's quantized weights are the file's codes and scales (packed q/k/v and gate/up stacked
    by rows), byte for byte: nothing was requantized (g4c's round-to-nearest would pick other scales)."""
    path, art = ct_checkpoints[family], ct_artifacts[family]
    source = CompressedTensorsCheckpoint(path)
    manifest = json.loads((art / "manifest.json").read_text())
    recipes = manifest["weight_recipes"]

    def expected(name: str) -> tuple[np.ndarray, np.ndarray]:
        recipe = recipes.get(name, {})
        if "concat" in recipe:
            assert recipe["axis"] == 0
            parts = [expected(p) for p in recipe["concat"]]
            return np.concatenate([d for d, _ in parts]), np.concatenate([s for _, s in parts])
        if "rows" in recipe:
            data, scales = expected(recipe["rows"][0])
            return data[recipe["rows"][1]:recipe["rows"][2]], scales[recipe["rows"][1]:recipe["rows"][2]]
        return file_blocks(path, name)[1:]

    leaves, requantized_differs = set(), False
    with safe_open(str(art / "weights.safetensors"), framework="numpy") as f:
        for name, recipe in recipes.items():
            if "quant" not in recipe or recipe["quant"][2] != "data":
                continue
            source_name, scheme = recipe["quant"][:2]
            leaves.update(_leaves(source_name, recipes))
            data, scales = expected(source_name)
            assert np.array_equal(f.get_tensor(name).view(np.uint8).reshape(data.shape), data), name
            assert np.array_equal(f.get_tensor(f"{source_name}.{scheme}_scales").astype(np.float32), scales), name
            requantized = quantize(dequantize(data.view(np.uint32), scales, scheme), scheme)
            requantized_differs |= not np.array_equal(requantized[0].view(np.uint8), data)
    stored = {n for n in source.names() if source.quantized(n) is not None}
    assert leaves == stored & set(expected_shapes(load_model(str(path)).cfg))  # every one the model uses
    assert requantized_differs  # the check above could tell a requantization apart


def test_bf16_scales_are_exact(ct_checkpoints):
    """bf16 scales become float32 exactly, and the values are the exact products q · scale (at most 8
    significant bits times 8: exact in fp32; compressed-tensors' own dequantization rounds them to bf16)."""
    path = ct_checkpoints["dense"]
    source = CompressedTensorsCheckpoint(path)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
        for name in source.names():
            if source.quantized(name) is None:
                continue
            module = hf_module(name)
            packed, scale = f.get_tensor(f"{module}.weight_packed"), f.get_tensor(f"{module}.weight_scale")
            assert scale.dtype == torch.bfloat16
            rows, cols = source.shape(name)
            codes = unpack_from_int32(packed, packed.shape[1] * 32 // cols, torch.Size([rows, cols])).double()
            exact = (codes * scale.double().repeat_interleave(cols // scale.shape[1], dim=1)).numpy()
            assert np.array_equal(source.get(name).astype(np.float64), exact), name
            assert np.array_equal(source.quantized(name)[2], file_blocks(path, name)[2])


def test_naive_quantized_int8_is_q8(tmp_path):
    """The naive-quantized format (int8 codes stored as `weight`) maps onto q8 as it is."""
    path = write_compressed(tmp_path / "naive", QUANT_FAMILIES["dense"][0],
                            {"group_0": (["Linear"], dict(INT8, group_size=32))}, seed=8, fmt="naive-quantized")
    assert json.loads((path / "config.json").read_text())["quantization_config"]["format"] == "naive-quantized"
    source = load_model(str(path)).weights.source
    state = load_dequantized(path).state_dict()
    name = "layers.1.self_attn.q_proj.weight"
    scheme, data, scales = source.quantized(name)
    with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
        assert np.array_equal(data.view(np.int8), f.get_tensor(f"model.{name}"))
    assert scheme == "q8" and np.array_equal(source.get(name), state[f"model.{name}"].numpy())
    assert np.array_equal(dequantize(data, scales, scheme), source.get(name))


def test_vulkan_int4_checkpoint(ct_checkpoints, ct_references, tmp_path):
    """The dense checkpoint (q4 in groups of 128 and 32, q8) on Vulkan (lavapipe)."""
    os.environ.setdefault("WGPU_BACKEND_TYPE", "Vulkan")
    wgpu = pytest.importorskip("wgpu")
    try:
        adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    except Exception:  # noqa: BLE001 - no wgpu-native library, no driver
        adapter = None
    if adapter is None:
        pytest.skip("needs a Vulkan device (apt-get install mesa-vulkan-drivers)")
    loaded = load_model(str(ct_checkpoints["dense"]))
    art = compile_model(loaded.cfg, loaded.weights, "vulkan", tmp_path / "vk")
    reference = ct_references["dense"]
    expected, bound = _bound(reference, PROMPT)
    session = load(art, prefill_chunk=7)
    delta = float(np.abs(session.prefill(PROMPT, all_logits=True) - expected).max())
    print(f"vulkan dense: max|Δlogits| {delta:.3g} (bound {bound:.3g})")
    assert delta <= bound
    session.reset()
    assert session.generate(PROMPT[:6], 12) == reference_greedy(reference, PROMPT[:6], 12)


@pytest.mark.slow
def test_moe_router_int4_experts_float(tmp_path):
    """A MoE model: every Linear (attention, MLP, router) int4; the 3-D expert banks are no Linear
    modules, so compressed-tensors leaves them float and g4c compiles them in float."""
    path = write_compressed(tmp_path / "moe", QUANT_FAMILIES["moe"][0],
                            {"group_0": (["Linear"], dict(INT4, group_size=32, scale_dtype=torch.float16))}, seed=9)
    loaded = load_model(str(path))
    source = loaded.weights.source
    assert source.quantized_scheme("layers.0.router.proj.weight") == "q4"
    assert source.quantized("layers.0.experts.gate_up_proj") is None
    art = compile_model(loaded.cfg, loaded.weights, "llvm", tmp_path / "art")
    reference = ct_reference(path)
    expected, bound = _bound(reference, PROMPT)
    delta = float(np.abs(load(art, prefill_chunk=7).prefill(PROMPT, all_logits=True) - expected).max())
    print(f"moe: max|Δlogits| {delta:.3g} (bound {bound:.3g})")
    assert delta <= bound
    assert load(art).generate(PROMPT[:6], 16) == reference_greedy(reference, PROMPT[:6], 16)


# ---- what g4c refuses ----------------------------------------------------------------------------
TINY = QUANT_FAMILIES["dense"][0]


def _cli_refuses(directory: Path, tmp_path: Path, *needles: str) -> str:
    out = tmp_path / "out.g4c"
    result = subprocess.run([sys.executable, "-m", "g4c.cli", "compile", str(directory), "-o", str(out)],
                            capture_output=True, text=True, timeout=120)
    err = result.stderr
    assert result.returncode != 0 and err.count("\n") == 1 and err.startswith("g4c: error: "), err
    assert "Traceback" not in err and all(n in err for n in needles), err
    assert not out.exists() and not any(out.name in p.name for p in tmp_path.iterdir())  # nor a temporary
    return err


def test_asymmetric_is_refused(tmp_path):
    path = write_compressed(tmp_path / "asym", TINY, {"group_0": (["Linear"], dict(INT4, group_size=32,
                                                                                    symmetric=False))}, seed=3)
    _cli_refuses(path, tmp_path, "weight_zero_point", "asymmetric")


def test_two_bits_are_refused(tmp_path):
    path = write_compressed(tmp_path / "int2", TINY, {"group_0": (["Linear"], dict(INT4, num_bits=2,
                                                                                    group_size=32))}, seed=3)
    _cli_refuses(path, tmp_path, "config_groups.group_0.weights.num_bits is 2", "weight_packed")


def test_truncated_file_is_refused(ct_checkpoints, tmp_path):
    path = tmp_path / "cut"
    shutil.copytree(ct_checkpoints["e"], path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 2 // 3])
    _cli_refuses(path, tmp_path, "model.safetensors")


@pytest.mark.parametrize("case, needle", [
    ("group16", "weights.group_size is 16"),
    ("channel", "weights.strategy is \"channel\""),
    ("w4a8", "input_activations is set"),
    ("kv_cache", "kv_cache_scheme"),
    ("not_compressed", "not compressed"),
    ("gptq", "quant_method 'gptq'"),
])
def test_unsupported_settings_are_one_line(case, needle, tmp_path):
    groups = {"group_0": (["Linear"], dict(INT4, group_size=32))}
    extra = {}
    if case == "group16":
        groups = {"group_0": (["Linear"], dict(INT4, group_size=16))}
    elif case == "channel":
        groups = {"group_0": (["Linear"], dict(INT4, strategy="channel"))}
    elif case == "w4a8":
        extra = {"input_activations": QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token",
                                                       dynamic=True)}
    path = write_compressed(tmp_path / case, TINY, groups, seed=3, **extra)
    config = json.loads((path / "config.json").read_text())
    if case == "kv_cache":
        config["quantization_config"]["kv_cache_scheme"] = dict(INT8, strategy="tensor", dynamic=False)
    elif case == "gptq":
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    elif case == "not_compressed":  # a float weight that config_groups quantizes
        from safetensors.torch import load_file, save_file

        tensors = load_file(path / "model.safetensors")
        module = "model.layers.0.mlp.up_proj"
        tensors[f"{module}.weight"] = torch.zeros(tuple(tensors.pop(f"{module}.weight_shape").tolist()))
        del tensors[f"{module}.weight_packed"], tensors[f"{module}.weight_scale"]
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(G4CError) as info:
        load_model(str(path))
    message = str(info.value)
    assert "\n" not in message and needle in message, message
    assert isinstance(info.value, CompressedTensorsError) or case == "gptq"
