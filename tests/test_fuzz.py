"""Property test: for random small Gemma 4 configs (layer patterns, GQA ratios, head dims, windows, PLE,
KV sharing, k_eq_v, MoE, partial RoPE), g4c's logits equal transformers' and cached decode equals a
full recompute."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hf_reference import hf_config, load_reference, make_checkpoint, reference_logits
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from g4c.config import config_from_dict
from g4c.errors import ConfigError
from g4c.model import load_model
from g4c.reference import ReferenceSession


@st.composite
def gemma4_configs(draw):
    layers = draw(st.integers(2, 6))
    types = draw(st.lists(st.sampled_from(["sliding_attention", "full_attention"]), min_size=layers, max_size=layers))
    types[-1] = "full_attention"
    heads = draw(st.sampled_from([2, 4]))
    k_eq_v = draw(st.booleans())
    moe = draw(st.booleans())
    experts = draw(st.integers(2, 5))
    vocab = draw(st.integers(40, 120))
    kwargs = dict(
        vocab_size=vocab, hidden_size=draw(st.sampled_from([16, 24])),
        intermediate_size=draw(st.sampled_from([16, 32])), num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0])),
        num_global_key_value_heads=draw(st.sampled_from([d for d in (1, 2) if heads % d == 0])),
        head_dim=draw(st.sampled_from([4, 8])), global_head_dim=draw(st.sampled_from([8, 12, 16])),
        sliding_window=draw(st.integers(1, 6)), layer_types=types, attention_k_eq_v=k_eq_v,
        num_kv_shared_layers=draw(st.integers(0, layers - 1)), use_double_wide_mlp=draw(st.booleans()),
        hidden_size_per_layer_input=draw(st.sampled_from([0, 4])), vocab_size_per_layer_input=vocab,
        enable_moe_block=moe, num_experts=experts if moe else None,
        top_k_experts=draw(st.integers(1, experts)) if moe else None, moe_intermediate_size=8 if moe else None,
        final_logit_softcapping=draw(st.sampled_from([None, 30.0])),
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "proportional", "rope_theta": 1_000_000.0,
                                            "partial_rotary_factor": draw(st.sampled_from([0.25, 0.5, 1.0]))}},
    )
    prompt_len = draw(st.integers(2, 12))
    return kwargs, prompt_len, draw(st.integers(0, 2**16))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gemma4_configs())
def test_random_configs_match_transformers(case):
    kwargs, prompt_len, seed = case
    try:
        config_from_dict({"model_type": "gemma4_text", **kwargs})
    except ConfigError:
        assume(False)  # e.g. a shared layer type without an earlier donor: transformers rejects it too
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, kwargs["vocab_size"], size=prompt_len).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp) / "m", hf_config(kwargs), seed=seed)
        expected = reference_logits(load_reference(path), prompt)
        loaded = load_model(str(path))
        session = ReferenceSession(loaded.cfg, loaded.weights)
        logits = session.prefill(prompt, all_logits=True)
        assert np.abs(logits - expected).max() <= 1e-4
        session.reset()
        session.prefill(prompt[:-1])
        np.testing.assert_allclose(session.decode(prompt[-1]), expected[-1], atol=1e-4, rtol=0)
