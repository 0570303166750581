"""Config reading: both spellings of the global-layer settings, wrappers, the 12B, presets, validation."""

from __future__ import annotations

import json

import pytest

from g4c.config import ModelConfig, config_from_dict, load_config
from g4c.errors import ConfigError
from g4c.presets import PRESETS, preset_config

BASE = {"model_type": "gemma4_text", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "sliding_window": 4, "hidden_size_per_layer_input": 0,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]}


def test_global_head_dim_spelling_equals_per_layer_config_spelling():
    published = config_from_dict({**BASE, "global_head_dim": 16, "num_global_key_value_heads": 1,
                                  "attention_k_eq_v": True})
    saved = config_from_dict({**BASE, "attention_k_eq_v": True,
                              "per_layer_config": {"1": {"head_dim": 16, "num_key_value_heads": 1},
                                                   "3": {"head_dim": 16, "num_key_value_heads": 1}}})
    assert published.layers == saved.layers
    assert [(s.head_dim, s.num_kv_heads) for s in saved.layers] == [(8, 2), (16, 1), (8, 2), (16, 1)]


def test_global_kv_heads_only_apply_with_k_eq_v():
    """transformers ignores num_global_key_value_heads unless attention_k_eq_v (E2B/E4B)."""
    cfg = config_from_dict({**BASE, "global_head_dim": 16, "num_global_key_value_heads": 1})
    assert cfg.layers[1].num_kv_heads == 2 and cfg.layers[1].head_dim == 16 and not cfg.layers[1].k_eq_v


def test_default_global_head_dim_is_512():
    assert config_from_dict(BASE).layers[1].head_dim == 512


def test_multimodal_wrapper_and_unified_types():
    wrapped = config_from_dict({"model_type": "gemma4", "text_config": {k: v for k, v in BASE.items()
                                                                         if k != "model_type"}})
    assert wrapped.model_type == "gemma4_text" and wrapped.hidden_size == 32
    text = {k: v for k, v in BASE.items() if k != "model_type"}
    unified = config_from_dict({"model_type": "gemma4_unified", "text_config": text})
    assert unified.family == "gemma4_unified" and not unified.has_ple and not unified.enable_moe_block
    assert config_from_dict({**BASE, "model_type": "gemma4_unified_text"}).family == "gemma4_unified"
    with pytest.raises(ConfigError, match="text_config.model_type"):
        config_from_dict({"model_type": "gemma4_unified", "text_config": dict(BASE)})


def test_rope_parameters_per_layer_type():
    cfg = config_from_dict(BASE)
    sliding, full = cfg.layers[0].rope, cfg.layers[1].rope
    assert (sliding.rope_type, sliding.theta) == ("default", 10_000.0)
    assert (full.rope_type, full.theta, full.partial_rotary_factor) == ("proportional", 1e6, 0.25)
    # proportional: int(0.25 * 512 / 2) = 64 of 256 pairs rotate, denominators use the full head_dim
    inv = full.inv_freq(512)
    assert inv.shape == (256,) and (inv[:64] > 0).all() and (inv[64:] == 0).all()
    assert inv[1] == pytest.approx(1e6 ** (-2 / 512), rel=1e-6)


def test_kv_sharing_modes_match_transformers():
    from transformers import Gemma4TextConfig

    kwargs = dict(num_hidden_layers=9, num_kv_shared_layers=4, hidden_size_per_layer_input=0,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 3)
    ours = ModelConfig(**kwargs)
    assert ours.kv_sharing_modes == Gemma4TextConfig(**kwargs).kv_sharing_modes
    assert [s.kv_source for s in ours.layers] == [0, 1, 2, 3, 4, 2, 4, 4, 2]


@pytest.mark.parametrize("patch, field", [
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"layer_types": ["sliding_attention"] * 4}, "layer_types"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
    ({"layer_types": ["sliding_attention", "full_attention", "local", "full_attention"]}, "layer_types"),
    ({"hidden_size": "big"}, "hidden_size"),
    ({"num_kv_shared_layers": 4}, "num_kv_shared_layers"),
    ({"num_kv_shared_layers": 3}, "num_kv_shared_layers"),
    ({"enable_moe_block": True}, "num_experts"),
    ({"enable_moe_block": True, "num_experts": 2, "top_k_experts": 4, "moe_intermediate_size": 8}, "top_k_experts"),
    ({"hidden_activation": "relu"}, "hidden_activation"),
    ({"rms_norm_eps": -1}, "rms_norm_eps"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "yarn", "rope_theta": 1.0},
                          "full_attention": {"rope_type": "default", "rope_theta": 1.0}}}, "rope_parameters"),
    ({"per_layer_config": {"1": {"head_dim": 16, "num_key_value_heads": 3}}}, "per_layer_config.1.num_key_value_heads"),
    ({"per_layer_config": {"9": {"head_dim": 16}}}, "per_layer_config"),
    ({"per_layer_config": {"1": {"intermediate_size": 16}}}, "per_layer_config.1.intermediate_size"),
    ({"model_type": "llama"}, "model_type"),
])
def test_inconsistent_config_is_one_line_error_naming_the_field(patch, field):
    with pytest.raises(ConfigError) as info:
        config_from_dict({**BASE, **patch})
    message = str(info.value)
    assert field in message and "\n" not in message


def test_malformed_json_and_missing_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="config.json not found"):
        load_config(tmp_path / "nowhere")


# Published numbers (transformers convert_gemma4_weights.py _VARIANTS; docs/gemma4-architecture.md).
@pytest.mark.parametrize("name, hidden, layers, heads, kv, global_kv, inter, window, shared, ple, n_full", [
    ("e2b", 1536, 35, 8, 1, 1, 6144, 512, 20, 256, 7),
    ("e4b", 2560, 42, 8, 2, 2, 10240, 512, 18, 256, 7),
    ("12b", 3840, 48, 16, 8, 1, 15360, 1024, 0, 0, 8),
    ("26b-a4b", 2816, 30, 16, 8, 2, 2112, 1024, 0, 0, 5),
    ("31b", 5376, 60, 32, 16, 4, 21504, 1024, 0, 0, 10),
])
def test_published_presets(name, hidden, layers, heads, kv, global_kv, inter, window, shared, ple, n_full):
    cfg = preset_config(name)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (hidden, layers, heads)
    assert cfg.intermediate_size == inter and cfg.sliding_window == window
    assert cfg.num_kv_shared_layers == shared and cfg.hidden_size_per_layer_input == ple
    assert sum(not s.is_sliding for s in cfg.layers) == n_full and not cfg.layers[-1].is_sliding
    assert {s.num_kv_heads for s in cfg.layers if not s.is_sliding} == {global_kv}
    assert {s.head_dim for s in cfg.layers if not s.is_sliding} == {512}
    assert cfg.vocab_size == 262_144 and cfg.final_logit_softcapping == 30.0 and cfg.tie_word_embeddings


def test_moe_preset_and_double_wide():
    moe = preset_config("26b-a4b")
    assert (moe.num_experts, moe.top_k_experts, moe.moe_intermediate_size) == (128, 8, 704)
    e2b = preset_config("e2b")
    assert {s.mlp_intermediate for s in e2b.layers if s.kv_mode == "reuse"} == {12288}


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_transformers_config(name):
    """Every preset's config.json is accepted by transformers with the same per-layer geometry."""
    from transformers import AutoConfig

    cfg = preset_config(name)
    hf = AutoConfig.for_model(**cfg.to_hf_dict())
    assert hf.layer_types == cfg.layer_types
    assert hf.kv_sharing_modes == cfg.kv_sharing_modes
    for spec in cfg.layers:
        assert hf.per_layer_config[spec.index].head_dim == spec.head_dim
        assert hf.per_layer_config[spec.index].num_key_value_heads == spec.num_kv_heads
    assert config_from_dict(json.loads(json.dumps(cfg.to_hf_dict()))).layers == cfg.layers


def test_with_layers_keeps_pattern_and_shared_tail():
    cut = preset_config("e2b", num_layers=10)
    assert cut.num_hidden_layers == 10 and cut.layer_types[-1] == "full_attention"
    assert cut.num_kv_shared_layers > 0
    assert {s.layer_type for s in cut.layers if s.kv_mode == "store"} == {"sliding_attention", "full_attention"}
    assert cut.layers[-1].head_dim == 512
