"""Write a Gemma 4 GGUF from a tiny transformers checkpoint the way llama.cpp's converter does.

Mirrors `convert_hf_to_gguf.py` (llama.cpp `conversion/gemma.py` `Gemma4Model(Gemma3Model)` and
`conversion/base.py` `TextModel`), step by step, for a text-only `Gemma4ForCausalLM` checkpoint:
- metadata: `TextModel.set_gguf_parameters`, then `Gemma3Model.set_gguf_parameters`, then
  `Gemma4Model.set_gguf_parameters` (later calls overwrite keys, as gguf's writer does);
- tensors: `Gemma4Model.generate_extra_tensors` (`rope_freqs`) first, then every checkpoint tensor
  through `Gemma4Model.filter_tensors` (`layer_scalar` / experts get a `.weight` suffix),
  `Gemma4Model.modify_tensors` (`router.scale` → `ffn_gate_inp.scale`, `router.per_expert_scale` →
  `ffn_down_exps.scale`), `Gemma3Model.modify_tensors` (norm shift 0 for Gemma 4: values unchanged)
  and gguf's `TensorNameMap`;
- types: `ModelBase.prepare_tensors`: 1-D tensors, `*_norm.weight`, the router matrix
  (`ffn_gate_inp`) and names not ending in `.weight` are F32; the rest take the file type, with the
  converter's fallback to F16 when a row is not a whole number of quantization blocks.

Differences, on purpose: the tiny checkpoints have no tokenizer, so a placeholder vocabulary is
written (the converter would write the real one and cut `token_embd` to its length, a no-op for
Gemma 4's 262144 tokens); the file types Q4_0 (and per-tensor overrides such as Q4_K) are what
llama-quantize would store, the converter itself writes F32/F16/BF16/Q8_0; `split_experts` writes
`ffn_gate_exps` + `ffn_up_exps`, a layout llama.cpp's loader accepts but this converter does not write.
The checkpoints are saved by a transformers version that spells the global layers as
`per_layer_config`; the converter reads the published configs' `global_head_dim` /
`num_global_key_value_heads`, so they are derived first (`converter_hparams`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors import safe_open

Q = gguf.GGMLQuantizationType
FILE_TYPES = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
              "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}


def converter_hparams(checkpoint: Path) -> dict[str, Any]:
    """config.json as the converter sees it (text_config moved to the top), in the published spelling."""
    hp = json.loads((Path(checkpoint) / "config.json").read_text())
    if "text_config" in hp:
        hp = {**hp, **hp["text_config"]}
    plc = hp.get("per_layer_config") or {}
    full = [i for i, t in enumerate(hp["layer_types"]) if t == "full_attention"]
    if full and hp.get("global_head_dim") is None:
        override = plc.get(str(full[0]), {})
        hp["global_head_dim"] = override.get("head_dim", hp["head_dim"])
        if hp.get("num_global_key_value_heads") is None and hp.get("attention_k_eq_v"):
            hp["num_global_key_value_heads"] = override.get("num_key_value_heads")
    return hp


def set_gguf_parameters(w: gguf.GGUFWriter, hp: dict[str, Any], ftype) -> None:
    """TextModel, Gemma3Model and Gemma4Model `set_gguf_parameters`, in that order."""
    n = hp["num_hidden_layers"]
    rope = hp.get("rope_parameters") or {}
    # TextModel.set_gguf_parameters
    w.add_block_count(n)
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp["num_key_value_heads"])
    rope_params = rope.get("full_attention", rope)  # rope_type "proportional": "Unknown RoPE type", nothing written
    if (theta := rope_params.get("rope_theta")) is not None:
        w.add_rope_freq_base(theta)
    if (theta_swa := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        w.add_rope_freq_base_swa(theta_swa)
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if hp.get("num_experts") is not None:
        w.add_expert_count(hp["num_experts"])
    if hp.get("top_k_experts") is not None:
        w.add_expert_used_count(hp["top_k_experts"])
    if hp.get("head_dim") is not None:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    w.add_file_type(ftype)
    # Gemma3Model.set_gguf_parameters
    w.add_context_length(hp.get("max_position_embeddings", 131072))
    w.add_head_count(hp.get("num_attention_heads", 8))
    w.add_layer_norm_rms_eps(hp.get("rms_norm_eps", 1e-6))
    w.add_key_length(hp.get("head_dim", 256))
    w.add_value_length(hp.get("head_dim", 256))
    w.add_rope_freq_base(rope.get("full_attention", rope).get("rope_theta", 1_000_000.0))
    if hp.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(hp["final_logit_softcapping"])
    if hp.get("sliding_window_pattern") != 1:
        w.add_sliding_window(hp["sliding_window"])
    w.add_head_count_kv(hp.get("num_key_value_heads", 4))
    # Gemma4Model.set_gguf_parameters
    shared = hp["num_kv_shared_layers"]
    w.add_shared_kv_layers(shared)
    w.add_embedding_length_per_layer_input(hp.get("hidden_size_per_layer_input") or 0)
    swa = [t == "sliding_attention" for t in hp["layer_types"]]
    w.add_sliding_window_pattern(swa)
    w.add_key_length(hp["global_head_dim"])
    w.add_value_length(hp["global_head_dim"])
    w.add_key_length_swa(hp["head_dim"])
    w.add_value_length_swa(hp["head_dim"])
    expert_ff = hp.get("expert_intermediate_size", hp.get("moe_intermediate_size"))
    if expert_ff is not None:
        w.add_expert_feed_forward_length(expert_ff)
    if hp.get("use_double_wide_mlp", False):
        n_ff = hp["intermediate_size"]
        w.add_feed_forward_length([n_ff if i < n - shared else n_ff * 2 for i in range(n)])
    kv_full, kv_swa = hp.get("num_global_key_value_heads"), hp.get("num_key_value_heads")
    if kv_full is not None and kv_swa is not None:
        w.add_head_count_kv([kv_swa if s else kv_full for s in swa])
    w.add_rope_dimension_count(int(hp["global_head_dim"]))
    w.add_rope_dimension_count_swa(int(hp["head_dim"] * rope.get("partial_rotary_factor", 1.0)))


def set_vocab(w: gguf.GGUFWriter, hp: dict[str, Any], merges: int = 0) -> None:
    """Placeholder vocabulary (the checkpoints have no tokenizer), `merges` placeholder BPE merges (Gemma 4
    has 514906) and the special ids SpecialVocab reads from config.json."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"t{i}" for i in range(4, hp["vocab_size"])]
    w.add_tokenizer_model("gemma4")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([gguf.TokenType.CONTROL] * 4 + [gguf.TokenType.NORMAL] * (len(tokens) - 4))
    if merges:
        w.add_token_merges([f"t{i % 90 + 4} t{i // 90 % 90 + 4}" for i in range(merges)])
    for kind in ("bos", "eos", "pad"):
        if isinstance(hp.get(f"{kind}_token_id"), int):
            getattr(w, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "pad": "add_pad_token_id"}[kind])(
                hp[f"{kind}_token_id"])
    w.add_add_space_prefix(False)
    w.add_add_bos_token(True)


def rope_freqs(hp: dict[str, Any]) -> np.ndarray:
    """Gemma4Model.generate_extra_tensors."""
    full = hp["rope_parameters"]["full_attention"]
    assert full["rope_type"] == "proportional"
    head = hp["global_head_dim"]
    rot = int(head * full["partial_rotary_factor"] / 2)
    return np.array([1.0] * rot + [1e30] * (int(head / 2) - rot), dtype=np.float32)


def gguf_tensor_name(name: str, bid: int | None, tensor_map) -> str:
    """filter_tensors + modify_tensors + map_tensor_name of Gemma4Model for one HF tensor name."""
    if name.endswith(("per_dim_scale", "layer_scalar")):
        name += ".weight"
    if ".experts." in name and not name.endswith((".weight", ".weight_scale", ".weight_scale_2", ".input_scale")):
        name += ".weight"
    if name.endswith("router.scale"):
        return f"blk.{bid}.ffn_gate_inp.scale"
    if ".per_expert_scale" in name:
        return f"blk.{bid}.ffn_down_exps.scale"
    new = tensor_map.get_name(key=name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise ValueError(f"Can not map tensor {name!r}")
    return new


def tensor_type(new_name: str, n_dims: int, file_type: str):
    """ModelBase.prepare_tensors' choice (before the quantization fallback)."""
    if n_dims <= 1 or new_name.endswith("_norm.weight"):
        return Q.F32
    if re.fullmatch(r"blk\.\d+\.ffn_gate_inp\.weight", new_name) or new_name[-7:] not in (".weight", ".lora_a", ".lora_b"):
        return Q.F32
    return Q[file_type]


def synthetic_k_quant(shape: tuple[int, ...], qtype, seed: int = 0) -> np.ndarray:
    """Random Q4_K / Q6_K blocks with a small fp16 super-block scale: gguf-py cannot quantize to
    K-quants (llama-quantize does), so the tests store random blocks and compare against gguf's
    dequantization of them."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(seed).integers(0, 256, size=(*shape[:-1], shape[-1] // block, size), dtype=np.uint8)
    d = np.frombuffer(np.float16(2e-4).tobytes(), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d, dmin, scales[12], qs[128]
        raw[..., 0:2] = d
        raw[..., 2:4] = d
    elif qtype == Q.Q6_K:  # ql[128], qh[64], scales[16], d
        raw[..., -2:] = d
    else:
        raise ValueError(f"no synthetic blocks for {qtype.name}")
    return raw.reshape(*shape[:-1], -1)


def store(values: np.ndarray, qtype) -> tuple[np.ndarray, Any]:
    """gguf.quants.quantize with the converter's fallback to F16; other raw types for the error tests."""
    if qtype in (Q.F64, Q.I32, Q.I8):
        return values.astype({Q.F64: np.float64, Q.I32: np.int32, Q.I8: np.int8}[qtype]), qtype
    if qtype in (Q.Q4_K, Q.Q6_K):
        return synthetic_k_quant(values.shape, qtype), qtype
    try:
        return gguf.quants.quantize(values, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(values, Q.F16), Q.F16


def write_gguf(checkpoint: Path, path: Path, file_type: str = "F32", overrides: dict[str, str] | None = None,
               arch: str = "gemma4", drop: tuple[str, ...] = (), split_experts: bool = False,
               merges: int = 0) -> dict[str, dict]:
    """Write `path`; returns {HF tensor name: {"gguf": name(s), "type": stored type, "values": the
    stored values as float32 (dequantized with gguf.quants, in the HF shape)}}. `overrides` maps GGUF
    tensor names to other GGML types; `drop` leaves GGUF tensors out."""
    hp = converter_hparams(checkpoint)
    w = gguf.GGUFWriter(str(path), arch)
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, hp["num_hidden_layers"])
    overrides = overrides or {}
    record: dict[str, dict] = {}

    def add(new_name: str, values: np.ndarray) -> tuple[str, np.ndarray]:
        qtype = Q[overrides[new_name]] if new_name in overrides else tensor_type(new_name, values.ndim, file_type)
        data, qtype = store(values, qtype)
        if new_name not in drop:
            w.add_tensor(new_name, data, raw_dtype=qtype)
        stored = (gguf.quants.dequantize(data, qtype) if qtype not in (Q.F64, Q.I32, Q.I8) else data)
        return qtype.name, np.asarray(stored, dtype=np.float32).reshape(values.shape)

    if any(t == "full_attention" for t in hp["layer_types"]):
        add("rope_freqs.weight", rope_freqs(hp))
    with safe_open(str(Path(checkpoint) / "model.safetensors"), framework="numpy") as f:
        for name in f.keys():
            values = np.asarray(f.get_tensor(name), dtype=np.float32)
            bid = next((int(p) for p in name.split(".") if p.isdecimal()), None)
            new_name = gguf_tensor_name(name, bid, tensor_map)
            if split_experts and new_name.endswith("ffn_gate_up_exps.weight"):
                half = values.shape[1] // 2
                parts = [add(new_name.replace("gate_up", "gate"), values[:, :half]),
                         add(new_name.replace("gate_up", "up"), values[:, half:])]
                record[name] = {"gguf": new_name, "type": parts[0][0],
                                "values": np.concatenate([p[1] for p in parts], axis=1)}
                continue
            kind, stored = add(new_name, values)
            record[name] = {"gguf": new_name, "type": kind, "values": stored}
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(Path(checkpoint).name)
    set_gguf_parameters(w, hp, FILE_TYPES.get(file_type, gguf.LlamaFileType.ALL_F32))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    set_vocab(w, hp, merges)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return record
