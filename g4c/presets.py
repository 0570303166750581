"""Built-in model presets: the published Gemma 4 text decoders and tiny test models.

Sources of the published numbers (checked 2026-11-23):
- transformers `src/transformers/models/gemma4/convert_gemma4_weights.py`: `_VARIANTS["gemma-4-e2b"]`,
  `["gemma-4-e4b"]`, `["gemma-4-26b-a4b"]`, `["gemma-4-31b"]`, `_ROPE_PARAMS`, `_GEMMA_4_E2B_LAYER_TYPES`
  (4 sliding + 1 full, x7); fields the converter leaves unset take `Gemma4TextConfig` defaults
  (head_dim 256, global_head_dim 512, sliding_window 512, max_position_embeddings 131072);
- transformers `src/transformers/models/gemma4_unified/convert_gemma4_unified_weights.py`:
  `_VARIANTS["gemma-4-12b"]`, `_GEMMA_4_12B_LAYER_TYPES` (5 sliding + 1 full, x8). Its
  max_position_embeddings is not set there (class default 131072); 262144 follows the model card's
  256K context;
- cross-checked with ollama `x/models/gemma4/gemma4_test.go` (`TestParseTextConfig*`) and
  `docs/gemma4-architecture.md`.
All share: vocab 262144 (PLE vocab 262144), tied embeddings, final softcap 30, eps 1e-6,
gelu_pytorch_tanh, sliding RoPE theta 1e4 / global RoPE proportional theta 1e6 with factor 0.25,
head_dim 256 / global_head_dim 512, last layer global.
"""

from __future__ import annotations

from typing import Any

from g4c.config import FULL, SLIDING, ModelConfig, config_from_dict
from g4c.errors import G4CError


def _pattern(num_layers: int, period: int) -> list[str]:
    """`period - 1` sliding layers then one full layer, repeated (4:1 → period 5, 5:1 → period 6)."""
    types = [FULL if (i + 1) % period == 0 else SLIDING for i in range(num_layers)]
    types[-1] = FULL
    return types


_COMMON: dict[str, Any] = {
    "vocab_size": 262_144, "head_dim": 256, "global_head_dim": 512, "rms_norm_eps": 1e-6,
    "final_logit_softcapping": 30.0, "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh",
    "dtype": "bfloat16",
}

# HF config.json dicts (text configs), spelled as the published checkpoints spell them.
PUBLISHED: dict[str, dict[str, Any]] = {
    "e2b": {**_COMMON, "model_type": "gemma4_text", "hidden_size": 1536, "num_hidden_layers": 35,
            "num_attention_heads": 8, "num_key_value_heads": 1, "intermediate_size": 6144,
            "use_double_wide_mlp": True, "sliding_window": 512, "layer_types": _pattern(35, 5),
            "num_kv_shared_layers": 20, "hidden_size_per_layer_input": 256,
            "vocab_size_per_layer_input": 262_144, "max_position_embeddings": 131_072},
    "e4b": {**_COMMON, "model_type": "gemma4_text", "hidden_size": 2560, "num_hidden_layers": 42,
            "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 10240,
            "sliding_window": 512, "layer_types": _pattern(42, 6), "num_kv_shared_layers": 18,
            "hidden_size_per_layer_input": 256, "vocab_size_per_layer_input": 262_144,
            "max_position_embeddings": 131_072},
    "12b": {**_COMMON, "model_type": "gemma4_unified_text", "hidden_size": 3840, "num_hidden_layers": 48,
            "num_attention_heads": 16, "num_key_value_heads": 8, "num_global_key_value_heads": 1,
            "attention_k_eq_v": True, "intermediate_size": 15360, "sliding_window": 1024,
            "layer_types": _pattern(48, 6), "max_position_embeddings": 262_144,
            "use_bidirectional_attention": "vision"},
    "26b-a4b": {**_COMMON, "model_type": "gemma4_text", "hidden_size": 2816, "num_hidden_layers": 30,
                "num_attention_heads": 16, "num_key_value_heads": 8, "num_global_key_value_heads": 2,
                "attention_k_eq_v": True, "intermediate_size": 2112, "enable_moe_block": True,
                "num_experts": 128, "top_k_experts": 8, "moe_intermediate_size": 704, "sliding_window": 1024,
                "layer_types": _pattern(30, 6), "hidden_size_per_layer_input": 0,
                "max_position_embeddings": 262_144, "use_bidirectional_attention": "vision"},
    "31b": {**_COMMON, "model_type": "gemma4_text", "hidden_size": 5376, "num_hidden_layers": 60,
            "num_attention_heads": 32, "num_key_value_heads": 16, "num_global_key_value_heads": 4,
            "attention_k_eq_v": True, "intermediate_size": 21504, "sliding_window": 1024,
            "layer_types": _pattern(60, 6), "hidden_size_per_layer_input": 0, "max_position_embeddings": 262_144,
            "use_bidirectional_attention": "vision"},
}

_TINY: dict[str, Any] = {"vocab_size": 512, "hidden_size": 64, "num_attention_heads": 4, "head_dim": 16,
                         "global_head_dim": 32, "rms_norm_eps": 1e-6, "final_logit_softcapping": 30.0,
                         "sliding_window": 8, "max_position_embeddings": 4096, "dtype": "float32"}

# Tiny models that exercise every feature, for tests and quick CLI runs (prompts > sliding_window).
TINY: dict[str, dict[str, Any]] = {
    # E-type: PLE + KV sharing (2 shared layers) + double-wide MLP on shared layers.
    "tiny-e": {**_TINY, "model_type": "gemma4_text", "num_hidden_layers": 6, "num_key_value_heads": 1,
               "intermediate_size": 96, "use_double_wide_mlp": True, "layer_types": _pattern(6, 3),
               "num_kv_shared_layers": 2, "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": 512},
    # 26B-type: MoE next to the dense MLP, k_eq_v global layers with their own KV-head count.
    "tiny-moe": {**_TINY, "model_type": "gemma4_text", "num_hidden_layers": 4, "num_key_value_heads": 2,
                 "num_global_key_value_heads": 1, "attention_k_eq_v": True, "intermediate_size": 64,
                 "enable_moe_block": True, "num_experts": 8, "top_k_experts": 2, "moe_intermediate_size": 32,
                 "layer_types": _pattern(4, 2), "hidden_size_per_layer_input": 0},
    # 31B-type dense model.
    "tiny-dense": {**_TINY, "model_type": "gemma4_text", "num_hidden_layers": 5, "num_key_value_heads": 2,
                   "intermediate_size": 128, "layer_types": _pattern(5, 3), "hidden_size_per_layer_input": 0},
    # 12B-type unified decoder (no PLE, no MoE), k_eq_v.
    "tiny-unified": {**_TINY, "model_type": "gemma4_unified_text", "num_hidden_layers": 4,
                     "num_key_value_heads": 2, "num_global_key_value_heads": 1, "attention_k_eq_v": True,
                     "intermediate_size": 96, "layer_types": _pattern(4, 4)},
}

PRESETS: dict[str, dict[str, Any]] = {**PUBLISHED, **TINY}


def preset_config(name: str, num_layers: int | None = None) -> ModelConfig:
    """The config of a built-in preset, optionally cut to `num_layers` layers."""
    key = name.lower()
    if key not in PRESETS:
        raise G4CError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)} or pass a checkpoint directory")
    cfg = config_from_dict(PRESETS[key], source=f"preset {key}")
    return cfg.with_layers(num_layers) if num_layers else cfg
