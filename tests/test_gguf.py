"""GGUF files as llama.cpp's converter writes Gemma 4 (tests/gguf_writer.py) load as a MODEL: the
config equals the checkpoint's, every tensor is the checkpoint's (or its dequantized blocks), Q8_0/Q4_0
blocks come out in g4c.quant's layout unchanged, and `g4c logits model.gguf` matches transformers run
on the same (dequantized) weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import torch  # noqa: E402
from conftest import PROMPT  # noqa: E402
from gguf_writer import write_gguf  # noqa: E402
from hf_reference import hf_config, load_reference, make_checkpoint, reference_logits  # noqa: E402

from g4c.cli import main  # noqa: E402
from g4c.config import load_config  # noqa: E402
from g4c.gguf_model import GGUFError, is_gguf, load_gguf  # noqa: E402
from g4c.model import load_model, model_config  # noqa: E402
from g4c.quant import dequantize, packed_shapes  # noqa: E402
from g4c.weights import Checkpoint  # noqa: E402

# Families whose matrices have a reduction width that is a multiple of 32 (the e/moe test families
# have hidden sizes 48 and 40: the converter stores most of their matrices as F16 when asked for Q8_0),
# and one with width 256 for K-quants.
EXTRA = {
    # PLE (width 32 per layer), KV sharing of both types, double-wide MLP.
    "e32": dict(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=1, head_dim=32, global_head_dim=64, sliding_window=5,
                layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                num_kv_shared_layers=2, use_double_wide_mlp=True, hidden_size_per_layer_input=32,
                vocab_size_per_layer_input=96, final_logit_softcapping=30.0),
    # MoE beside the dense MLP, k_eq_v global layers with one KV head.
    "moe32": dict(vocab_size=80, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=2, num_global_key_value_heads=1, attention_k_eq_v=True, head_dim=32,
                  global_head_dim=64, sliding_window=4,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                  enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
                  hidden_size_per_layer_input=0, final_logit_softcapping=30.0),
    "k256": dict(vocab_size=64, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, global_head_dim=64, sliding_window=4,
                 layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=0,
                 final_logit_softcapping=30.0),
}
K_QUANTS = {"token_embd.weight": "Q6_K", "blk.0.attn_q.weight": "Q4_K", "blk.0.ffn_gate.weight": "Q6_K",
            "blk.1.ffn_up.weight": "Q4_K", "blk.1.attn_k.weight": "Q5_0", "blk.0.ffn_down.weight": "Q4_1",
            "blk.1.attn_q.weight": "BF16"}


@pytest.fixture(scope="module")
def models(checkpoints, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-ckpt")
    extra = {name: make_checkpoint(root / name, hf_config(kwargs), seed=20 + i) for i, (name, kwargs) in enumerate(EXTRA.items())}
    return {**checkpoints, **extra}


@pytest.fixture(scope="module")
def written(models, tmp_path_factory):
    """(family, variant) → (gguf path, record of what the writer stored)."""
    root = tmp_path_factory.mktemp("gguf")
    cache = {}

    def get(family: str, file_type: str = "F32", **options):
        key = (family, file_type, tuple(sorted((k, str(v)) for k, v in options.items())))
        if key not in cache:
            path = root / f"{family}-{file_type}-{len(cache)}.gguf"
            cache[key] = path, write_gguf(models[family], path, file_type, **options)
        return cache[key]
    return get


@pytest.mark.parametrize("family", ["e", "moe", "dense"])
def test_f32_file_is_the_checkpoint(family, models, written):
    path, record = written(family)
    cfg, source = load_gguf(path)
    assert cfg == load_config(models[family])
    ckpt = Checkpoint(models[family])
    assert sorted(source.names()) == sorted(ckpt.names())
    for name in ckpt.names():
        assert source.shape(name) == ckpt.shape(name), name
        assert np.array_equal(source.get(name), ckpt.get(name)), name
        assert source.get(name).dtype == np.float32 and source.quantized(name) is None
        assert source.gguf_names(name) == [record["model." + name]["gguf"]]  # gguf's own TensorNameMap
    loaded = load_model(str(path))
    assert loaded.directory is None and loaded.cfg == cfg and model_config(str(path)) == cfg


def test_long_vocabulary_arrays_are_skipped(models, written):
    """A real vocabulary (514906 merges) is not parsed element by element (gguf's reader: ~25 s)."""
    path, _ = written("dense", merges=5000)
    cfg, source = load_gguf(path)
    assert cfg == load_config(models["dense"]) and (cfg.bos_token_id, cfg.eos_token_id) == (2, 1)
    assert np.array_equal(source.get("embed_tokens.weight"), Checkpoint(models["dense"]).get("embed_tokens.weight"))


@pytest.mark.parametrize("family,file_type", [("dense", "Q8_0"), ("dense", "Q4_0"), ("e32", "Q4_0"),
                                              ("moe32", "Q8_0")])
def test_quantized_blocks_are_used_as_stored(family, file_type, models, written):
    path, record = written(family, file_type)
    cfg, source = load_gguf(path)
    assert cfg == load_config(models[family])
    scheme = {"Q8_0": "q8", "Q4_0": "q4"}[file_type]
    seen = set()
    for hf_name, stored in record.items():
        name = hf_name.removeprefix("model.")
        values = source.get(name)
        assert source.ggml_type(name) == stored["type"], name
        assert np.array_equal(values, stored["values"]), name  # gguf's dequantization of the stored blocks
        seen.add(stored["type"])
        packed = source.quantized(name)
        if stored["type"] != file_type:
            assert packed is None and source.quantized_scheme(name) is None
            continue
        kind, data, scales = packed
        assert kind == scheme == source.quantized_scheme(name)
        assert data.dtype == np.uint32 and scales.dtype == np.float32
        assert (data.shape, scales.shape) == packed_shapes(source.shape(name), scheme)
        assert np.array_equal(dequantize(data, scales, scheme), values), name
    assert file_type in seen and "F32" in seen
    if cfg.has_ple:  # the PLE table row by row, without converting the whole table
        ids = np.array([3, 0, 95, 3])
        assert np.array_equal(source.rows("embed_tokens_per_layer.weight", ids),
                              source.get("embed_tokens_per_layer.weight")[ids])


def test_split_expert_layout_is_concatenated(models, written):
    path, record = written("moe32", "Q8_0", split_experts=True)
    _, source = load_gguf(path)
    name = "layers.1.experts.gate_up_proj"
    assert source.gguf_names(name) == ["blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight"]
    assert np.array_equal(source.get(name), record["model." + name]["values"])
    kind, data, scales = source.quantized(name)
    assert np.array_equal(dequantize(data, scales, kind), source.get(name))


def _transformers_logits(checkpoint: Path, record: dict, tokens: list[int]) -> np.ndarray:
    """transformers on the checkpoint with every tensor replaced by the values stored in the GGUF file."""
    model = load_reference(checkpoint)
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for hf_name, stored in record.items():
            state[hf_name].copy_(torch.from_numpy(stored["values"]))
    return reference_logits(model, tokens)


@pytest.mark.parametrize("family,file_type,overrides", [
    ("e", "F32", None), ("moe", "F32", None), ("dense", "Q4_0", None), ("e32", "Q8_0", None),
    ("moe32", "Q4_0", None), ("k256", "F32", K_QUANTS)])
def test_logits_match_transformers(family, file_type, overrides, models, written, tmp_path, capsys):
    path, record = written(family, file_type, **({"overrides": overrides} if overrides else {}))
    if overrides:
        assert {record[f"model.{n}"]["type"] for n in (
            "embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "layers.1.mlp.up_proj.weight")} == {"Q6_K", "Q4_K"}
    vocab = load_gguf(path)[0].input_vocab_size
    tokens = [t % vocab for t in PROMPT]
    out = tmp_path / "logits.npy"
    assert main(["logits", str(path), "--tokens", ",".join(map(str, tokens)), "-o", str(out)]) == 0
    expected = _transformers_logits(models[family], record, tokens)
    assert np.max(np.abs(np.load(out) - expected)) <= 1e-4


def _one_line_error(args: list[str], capsys) -> str:
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("g4c: error: ") and "Traceback" not in err
    return err


def test_bad_files_are_one_line(written, tmp_path, capsys):
    path, _ = written("dense")
    logits = ["--tokens", "2,3", "-o", str(tmp_path / "o.npy")]

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    assert "truncated" in _one_line_error(["logits", str(truncated), *logits], capsys)

    other = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(other), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    assert "architecture 'llama'" in _one_line_error(["inspect", str(other)], capsys)

    bad_type, _ = written("dense", "F32", overrides={"blk.0.attn_q.weight": "F64"})
    err = _one_line_error(["logits", str(bad_type), *logits], capsys)
    assert "blk.0.attn_q.weight" in err and "F64" in err

    unknown = tmp_path / "unknown-type.gguf"  # a GGML type id gguf does not know (a newer llama.cpp's)
    data = bytearray(path.read_bytes())
    at = data.index(b"blk.0.attn_q.weight") + len(b"blk.0.attn_q.weight")
    at += 4 + 8 * int.from_bytes(data[at:at + 4], "little")  # n_dims, dims, then the type
    data[at:at + 4] = (99).to_bytes(4, "little")
    unknown.write_bytes(bytes(data))
    err = _one_line_error(["logits", str(unknown), *logits], capsys)
    assert "blk.0.attn_q.weight" in err and "type id 99" in err

    missing, _ = written("dense", "F32", drop=("blk.1.attn_q.weight",))
    assert "missing tensor blk.1.attn_q.weight" in _one_line_error(["logits", str(missing), *logits], capsys)

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all, but long enough to have a header")
    assert "not a readable GGUF file" in _one_line_error(["inspect", str(junk)], capsys)
    assert "no such file" in _one_line_error(["inspect", str(tmp_path / "none.gguf")], capsys)
    assert "--layers" in _one_line_error(["logits", str(path), "--layers", "1", *logits], capsys)
    with pytest.raises(GGUFError):
        load_gguf(truncated)


def test_gguf_model_on_the_command_line(written, tmp_path, capsys):
    path, _ = written("e")
    assert is_gguf(path) and not is_gguf(path.parent)
    renamed = tmp_path / "model.bin"  # no suffix: recognised by its magic
    renamed.write_bytes(path.read_bytes())
    assert is_gguf(renamed)
    assert main(["inspect", str(renamed)]) == 0
    assert "sliding" in capsys.readouterr().out
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(path.read_bytes()[:1000])
    result = subprocess.run([sys.executable, "-m", "g4c.cli", "inspect", str(truncated)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "truncated" in result.stderr


def test_compile_a_quantized_gguf(models, written, tmp_path):
    """`g4c compile model.gguf --quant q4`: Q4_0 blocks go into the artifact (as stored, or requantized
    to the same values), and the artifact's logits match transformers on the file's weights."""
    path, record = written("dense", "Q4_0")
    out = tmp_path / "dense.g4c"
    assert main(["compile", str(path), "--quant", "q4", "-o", str(out)]) == 0
    tokens = PROMPT[:8]
    assert main(["logits", str(out), "--tokens", ",".join(map(str, tokens)), "-o", str(tmp_path / "l.npy")]) == 0
    expected = _transformers_logits(models["dense"], record, tokens)
    assert np.max(np.abs(np.load(tmp_path / "l.npy") - expected)) <= 1e-4


@pytest.mark.slow  # ~25 s; CI time
def test_k_quants_are_converted_with_the_added_error_stated(written, tmp_path, capsys):
    """K-quant (and Q4_1/Q5_0) tensors have no g4c kernels: compiled as float32 they keep their exact
    values; with --quant q4 they are rounded again, and the manifest and the compile summary state the
    largest added |Δw|, per tensor, measured against the file's values."""
    from g4c.gguf_model import GGUFWeights
    from g4c.quant import dequantize, quantize

    path, _ = written("k256", "F32", overrides=K_QUANTS)
    source = GGUFWeights(path)
    converted_names = {n for n in source.names() if source.ggml_type(n) not in ("F32", "F16", "BF16")}
    assert len(converted_names) == 6
    for quant, held in (("none", "float32"), ("q4", "q4")):
        out = tmp_path / quant
        assert main(["compile", str(path), "--quant", quant, "-o", str(out), "--no-check"]) == 0
        converted = json.loads((out / "manifest.json").read_text())["converted_tensors"]
        assert set(converted) == converted_names
        for name, record in converted.items():
            assert record["stored"] == source.ggml_type(name) and record["as"] == held
            w = source.get(name)
            expected = 0.0 if held == "float32" else float(np.abs(dequantize(*quantize(w, "q4"), "q4") - w).max())
            assert record["max_abs_error"] == pytest.approx(expected, rel=1e-6) and (held == "float32") == (expected == 0)
        said = capsys.readouterr().out
        assert "converted 6 tensors stored as Q4_1, Q4_K, Q5_0, Q6_K" in said
        assert ("largest added error" in said) == (quant == "q4")


@pytest.mark.slow  # ~28 s; CI time (test_compile_a_quantized_gguf keeps a quantized GGUF compile by default)
def test_a_quantized_ple_table_stays_as_stored(written, tmp_path):
    """A GGUF whose PLE table is Q8_0: compiled without --quant-ple, the host table holds the file's
    blocks (no fp32 copy, no requantization); --quant-ple none asks for fp32."""
    from g4c.artifact.tensors import read_aligned_safetensors
    from g4c.gguf_model import GGUFWeights

    path, record = written("e32", "Q8_0")
    source = GGUFWeights(path)
    assert source.ggml_type("embed_tokens_per_layer.weight") == "Q8_0"
    _, data, scales = source.quantized("embed_tokens_per_layer.weight")
    out = tmp_path / "stored"
    assert main(["compile", str(path), "-o", str(out), "--no-check"]) == 0
    assert json.loads((out / "manifest.json").read_text())["host_quant"] == "q8"
    host = read_aligned_safetensors(out / "host.safetensors")
    assert np.array_equal(host["embed_tokens_per_layer.weight.q8"].view(np.uint8), data.view(np.uint8))
    assert np.array_equal(host["embed_tokens_per_layer.weight.q8_scales"], scales)
    assert main(["compile", str(path), "--quant-ple", "none", "-o", str(tmp_path / "f32"), "--no-check"]) == 0
    assert json.loads((tmp_path / "f32" / "manifest.json").read_text())["host_quant"] is None
