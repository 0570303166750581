"""Build tiny random Gemma 4 checkpoints *with transformers* and run transformers as the reference.

Every parameter and buffer is randomised (norm scales, `layer_scalar`, router scales included), the
model is saved with `save_pretrained`, and g4c reads it back through its real loading code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, Gemma4TextConfig
from transformers.models.gemma4_unified import Gemma4UnifiedTextConfig

# The three checkpoint families the issue names, plus the 12B unified decoder. Windows are small so
# that test prompts are longer than the sliding window.
FAMILIES: dict[str, dict[str, Any]] = {
    # E-type: PLE + KV sharing (3 shared layers, both types) + double-wide MLP on shared layers.
    "e": dict(vocab_size=300, hidden_size=48, intermediate_size=64, num_hidden_layers=7, num_attention_heads=4,
              num_key_value_heads=1, head_dim=12, global_head_dim=24, sliding_window=5,
              layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                           "full_attention", "sliding_attention", "full_attention"],
              num_kv_shared_layers=3, use_double_wide_mlp=True, hidden_size_per_layer_input=8,
              vocab_size_per_layer_input=300, final_logit_softcapping=30.0),
    # 26B-type: MoE beside the dense MLP + k_eq_v global layers with their own KV-head count.
    "moe": dict(vocab_size=280, hidden_size=40, intermediate_size=48, num_hidden_layers=5, num_attention_heads=4,
                num_key_value_heads=2, num_global_key_value_heads=1, attention_k_eq_v=True, head_dim=10,
                global_head_dim=20, sliding_window=6,
                layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                             "full_attention"],
                enable_moe_block=True, num_experts=6, top_k_experts=2, moe_intermediate_size=24,
                hidden_size_per_layer_input=0, final_logit_softcapping=30.0),
    # 31B-type dense model.
    "dense": dict(vocab_size=260, hidden_size=32, intermediate_size=72, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, global_head_dim=16, sliding_window=4,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                  hidden_size_per_layer_input=0, final_logit_softcapping=30.0),
}
UNIFIED: dict[str, Any] = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, num_global_key_value_heads=1,
                               attention_k_eq_v=True, head_dim=8, global_head_dim=16, sliding_window=4,
                               final_logit_softcapping=30.0,
                               layer_types=["sliding_attention", "sliding_attention", "sliding_attention",
                                            "full_attention"])


def hf_config(kwargs: dict[str, Any], unified: bool = False):
    cls = Gemma4UnifiedTextConfig if unified else Gemma4TextConfig
    return cls(**kwargs)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Random values in every parameter and persistent buffer: matrices small, scales around 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers()
                                                    if n.endswith("layer_scalar")]
        for name, t in tensors:
            if t.dim() <= 1:
                t.copy_(1.0 + 0.5 * (torch.rand(t.shape, generator=gen) - 0.5))
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.05)


def make_checkpoint(directory: Path, config, seed: int = 0, **save_kwargs) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, seed)
    model.save_pretrained(directory, **save_kwargs)
    return directory


def load_reference(directory: Path):
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def reference_logits(model, ids: list[int]) -> np.ndarray:
    # output_hidden_states disables transformers' KV-shared-layer slicing, which crashes on models with
    # KV sharing but no PLE (`per_layer_inputs[:, ...]` on None in `_maybe_slice_kv_shared_inputs`).
    with torch.no_grad():
        return model(torch.tensor([ids]), output_hidden_states=True).logits[0].float().numpy()


def reference_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    """transformers' own cached greedy generation, never stopping early."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0, use_cache=True)
    return out[0, len(ids):].tolist()
