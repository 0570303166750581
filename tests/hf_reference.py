"""Build tiny random Gemma 4 checkpoints *with transformers* and run transformers as the reference.

Every parameter and buffer is randomised (norm scales, `layer_scalar`, router scales included), the
model is saved with `save_pretrained`, and g4c reads it back through its real loading code.
"""

from __future__ import annotations

import json
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


# ---- multimodal (Gemma4ForConditionalGeneration) -----------------------------------------------
# A tiny vision tower (2 layers, GQA 4/2 heads of 8, axial RoPE); images get at most 70 soft tokens.
VISION: dict[str, Any] = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, position_embedding_size=64)
MAX_SOFT_TOKENS = 70


def media_token_ids(vocab: int) -> dict[str, int]:
    """Special ids near the top of a tiny vocabulary (transformers' defaults are out of its range)."""
    names = ("image_token_id", "boi_token_id", "eoi_token_id", "audio_token_id", "boa_token_id", "eoa_token_index")
    return {name: vocab - 10 + i for i, name in enumerate(names)}


def make_multimodal_checkpoint(directory: Path, text: dict[str, Any], vision: dict[str, Any] | None = VISION,
                               audio: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """A random `Gemma4ForConditionalGeneration` saved with its processor settings (image processor,
    audio feature extractor), as a Hub checkpoint is."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration
    from transformers.models.gemma4 import Gemma4AudioFeatureExtractor, Gemma4ImageProcessorPil

    config = Gemma4Config(text_config=text, vision_config=vision, audio_config=audio,
                          **media_token_ids(text["vocab_size"]))
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(config)
    randomize_(model, seed)
    model.save_pretrained(directory)
    # both processors' settings in one processor_config.json, as Gemma4Processor writes them (their own
    # save_pretrained would both write preprocessor_config.json)
    sections = {}
    if vision is not None:
        sections["image_processor"] = json.loads(Gemma4ImageProcessorPil(max_soft_tokens=MAX_SOFT_TOKENS).to_json_string())
    if audio is not None:
        sections["feature_extractor"] = json.loads(Gemma4AudioFeatureExtractor().to_json_string())
    (Path(directory) / "processor_config.json").write_text(json.dumps(sections))
    return directory


def load_multimodal_reference(directory: Path, dtype=torch.float64):
    from transformers import Gemma4ForConditionalGeneration

    return Gemma4ForConditionalGeneration.from_pretrained(directory, dtype=dtype, attn_implementation="eager").eval()


def multimodal_inputs(directory: Path, ids: list[int], images: list = (), clips: list = ()) -> dict[str, Any]:
    """transformers' model inputs for a prompt with one placeholder per image / clip: the processors'
    outputs and the placeholders expanded as `Gemma4Processor` expands them."""
    from transformers.models.gemma4 import Gemma4AudioFeatureExtractor, Gemma4ImageProcessorPil

    tokens = media_token_ids(_vocab(directory))
    inputs: dict[str, Any] = {}
    counts = {"image": [], "audio": []}
    if images:
        out = Gemma4ImageProcessorPil.from_pretrained(directory)(list(images), return_tensors="pt")
        inputs.update(pixel_values=out["pixel_values"], image_position_ids=out["image_position_ids"])
        counts["image"] = list(out["num_soft_tokens_per_image"])
    if clips:
        out = Gemma4AudioFeatureExtractor.from_pretrained(directory)([np.asarray(c) for c in clips], return_tensors="pt")
        inputs.update(input_features=out["input_features"], input_features_mask=out["input_features_mask"])
        counts["audio"] = [_audio_tokens(m.numpy()) for m in out["input_features_mask"]]
    expanded: list[int] = []
    queues = {k: list(v) for k, v in counts.items()}
    for t in ids:
        if t == tokens["image_token_id"]:
            expanded += [tokens["boi_token_id"]] + [t] * int(queues["image"].pop(0)) + [tokens["eoi_token_id"]]
        elif t == tokens["audio_token_id"]:
            expanded += [tokens["boa_token_id"]] + [t] * int(queues["audio"].pop(0)) + [tokens["eoa_token_index"]]
        else:
            expanded.append(t)
    input_ids = torch.tensor([expanded])
    mm = torch.zeros_like(input_ids)
    mm[input_ids == tokens["image_token_id"]] = 1
    mm[input_ids == tokens["audio_token_id"]] = 3
    return {"input_ids": input_ids, "mm_token_type_ids": mm, **inputs}


def _vocab(directory: Path) -> int:
    return json.loads((Path(directory) / "config.json").read_text())["text_config"]["vocab_size"]


def _audio_tokens(mask: np.ndarray) -> int:
    """`Gemma4Processor.replace_audio_token`: the mask after two stride-2 convolutions."""
    for _ in range(2):
        t_out = (len(mask) + 2 - 3) // 2 + 1
        mask = mask[::2][:t_out]
    return int(mask.sum())


def multimodal_logits(model, inputs: dict[str, Any]) -> np.ndarray:
    dtype = next(model.parameters()).dtype
    cast = {k: (v.to(dtype) if torch.is_floating_point(v) else v) for k, v in inputs.items()}
    with torch.no_grad():
        return model(**cast).logits[0].double().numpy()


def multimodal_greedy(model, inputs: dict[str, Any], new_tokens: int) -> list[int]:
    dtype = next(model.parameters()).dtype
    cast = {k: (v.to(dtype) if torch.is_floating_point(v) else v) for k, v in inputs.items()}
    with torch.no_grad():
        out = model.generate(**cast, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                             use_cache=True)
    return out[0, inputs["input_ids"].shape[1]:].tolist()
