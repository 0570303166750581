"""Weight loading: dtypes, prefixes, ignorable tensors, and one clear error for every bad checkpoint."""

from __future__ import annotations

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
from conftest import PROMPT
from hf_reference import load_reference, reference_logits
from safetensors.numpy import load_file, save_file

from g4c.errors import WeightError
from g4c.model import load_model
from g4c.reference import ReferenceSession
from g4c.weights import Checkpoint


def copy_checkpoint(src, dst, edit=None):
    shutil.copytree(src, dst)
    if edit is not None:
        tensors = load_file(str(dst / "model.safetensors"))
        edit(tensors)
        save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_match_transformers_upcast(dtype, checkpoints, tmp_path):
    """A bf16/fp16 checkpoint runs in fp32 exactly like transformers loading it with dtype=float32."""
    import torch

    model = load_reference(checkpoints["dense"]).to(getattr(torch, dtype))
    model.save_pretrained(tmp_path / dtype)
    loaded = load_model(str(tmp_path / dtype))
    assert loaded.weights.dtype() == dtype
    assert loaded.weights.get("norm.weight").dtype == np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16)
    ours = ReferenceSession(loaded.cfg, loaded.weights).prefill(PROMPT, all_logits=True)
    expected = reference_logits(load_reference(tmp_path / dtype), PROMPT)
    assert np.abs(ours - expected).max() <= 1e-4


def test_lazy_reads_do_not_load_every_tensor(checkpoints):
    ckpt = Checkpoint(checkpoints["e"])
    assert ckpt.prefix == "model."
    assert ckpt.shape("embed_tokens.weight") == (300, 48)
    assert ckpt.get("layers.0.self_attn.q_proj.weight").shape == (48, 48)


def test_missing_tensor(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints["dense"], tmp_path / "c",
                           lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(WeightError, match=r"missing tensor layers\.1\.self_attn\.k_norm\.weight \(expected shape \[16\]\)"):
        load_model(str(path))


def test_mis_shaped_tensor_names_both_shapes(checkpoints, tmp_path):
    def edit(t):
        t["model.layers.0.mlp.up_proj.weight"] = np.zeros((70, 32), np.float32)

    path = copy_checkpoint(checkpoints["dense"], tmp_path / "c", edit)
    with pytest.raises(WeightError, match=r"layers\.0\.mlp\.up_proj\.weight has shape \[70, 32\] but the config expects \[72, 32\]"):
        load_model(str(path))


def test_unexpected_tensor(checkpoints, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.extra.weight"] = np.zeros((3,), np.float32)

    path = copy_checkpoint(checkpoints["dense"], tmp_path / "c", edit)
    with pytest.raises(WeightError, match=r"unexpected tensor layers\.0\.self_attn\.extra\.weight with shape \[3\]"):
        load_model(str(path))


def test_shared_layers_may_carry_unused_kv_and_tied_head_copy(checkpoints, tmp_path):
    """Like transformers, K/V weights on KV-shared layers and a tied lm_head copy are ignored."""
    def edit(t):
        t["model.layers.6.self_attn.k_proj.weight"] = np.zeros((24, 48), np.float32)
        t["lm_head.weight"] = t["model.embed_tokens.weight"]

    path = copy_checkpoint(checkpoints["e"], tmp_path / "c", edit)
    base = ReferenceSession(*_cw(load_model(str(checkpoints["e"])))).prefill(PROMPT)
    np.testing.assert_array_equal(ReferenceSession(*_cw(load_model(str(path)))).prefill(PROMPT), base)


def _cw(loaded):
    return loaded.cfg, loaded.weights


def test_corrupt_safetensors(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints["dense"], tmp_path / "c")
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(WeightError, match="unreadable safetensors file"):
        load_model(str(path))


def test_no_weights_and_bad_index(checkpoints, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(checkpoints["dense"] / "config.json", empty / "config.json")
    with pytest.raises(WeightError, match="no \\*.safetensors files"):
        load_model(str(empty))
    (empty / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(WeightError, match="lists shard model-1.safetensors, which does not exist"):
        load_model(str(empty))


def test_init_random_checkpoint_loads_in_transformers_without_warnings(tmp_path):
    """`g4c init-random` writes what transformers loads with nothing missing, unexpected or mis-shaped."""
    import torch
    from transformers import AutoModelForCausalLM

    from g4c.checkpoint import write_random_checkpoint
    from g4c.presets import preset_config

    for name in ("tiny-e", "tiny-moe", "tiny-unified"):
        path = write_random_checkpoint(preset_config(name), tmp_path / name, seed=5, dtype="bfloat16",
                                       shard_bytes=200_000)
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
        assert not any(info.values()), info
        loaded = load_model(str(path))
        ours = ReferenceSession(loaded.cfg, loaded.weights).prefill(PROMPT, all_logits=True)
        np.testing.assert_allclose(ours, reference_logits(model.eval(), PROMPT), atol=1e-4, rtol=0)


def test_failed_write_leaves_nothing(tmp_path):
    from g4c.checkpoint import write_checkpoint
    from g4c.presets import preset_config
    from g4c.weights import RandomWeights

    class Failing(RandomWeights):
        def get(self, name):
            if name.startswith("layers.2"):
                raise RuntimeError("disk full")
            return super().get(name)

    cfg = preset_config("tiny-dense")
    with pytest.raises(RuntimeError):
        write_checkpoint(cfg, Failing(cfg), tmp_path / "out", shard_bytes=50_000)
    assert list(tmp_path.iterdir()) == []


def test_streaming_safetensors_writer_round_trips(tmp_path):
    """g4c's tensor-by-tensor writer produces files safetensors itself reads back bit-exactly (every
    dtype an artifact stores; bf16 included), and so does g4c's aligned reader; a tensor whose shape
    disagrees with its header is refused."""
    from g4c.errors import G4CError
    from g4c.artifact import read_aligned_safetensors, write_safetensors

    rng = np.random.default_rng(0)
    arrays = {"b.w": rng.standard_normal((3, 5)).astype(np.float32),
              "a.half": rng.standard_normal((7,)).astype(np.float16),
              "c.bf16": rng.standard_normal((2, 3, 4)).astype(ml_dtypes.bfloat16),
              "d.ids": np.arange(5, dtype=np.int32), "e.pos": np.arange(3, dtype=np.int64)}
    specs = {n: (a.shape, a.dtype) for n, a in arrays.items()}
    produced = []
    write_safetensors(tmp_path / "x.safetensors", specs, lambda n: produced.append(n) or arrays[n])
    assert produced == sorted(arrays)  # one at a time, in file order
    loaded = load_file(str(tmp_path / "x.safetensors"))
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype and np.array_equal(loaded[name].view(np.uint8), array.view(np.uint8))
    ours = read_aligned_safetensors(tmp_path / "x.safetensors")
    assert np.array_equal(ours["c.bf16"], arrays["c.bf16"].view(np.uint16))
    with pytest.raises(G4CError, match="has shape"):
        write_safetensors(tmp_path / "y.safetensors", {"w": ((2, 2), np.float32)}, lambda n: np.zeros(3, np.float32))
