"""The reference backend reproduces transformers' Gemma4ForCausalLM on every checkpoint family:
fp32 logits within 1e-4, identical greedy continuations across the sliding window, and cached
decoding equal to a full recompute."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import PROMPT
from hf_reference import reference_greedy, reference_logits

from g4c.model import load_model
from g4c.reference import ReferenceSession

FAMILY_NAMES = ["e", "moe", "dense", "unified"]


def session_for(path) -> ReferenceSession:
    loaded = load_model(str(path))
    return ReferenceSession(loaded.cfg, loaded.weights)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_prompt_logits_match_transformers(family, checkpoints, references):
    logits = session_for(checkpoints[family]).prefill(PROMPT, all_logits=True)
    expected = reference_logits(references[family], PROMPT)
    assert logits.shape == expected.shape
    assert np.abs(logits - expected).max() <= 1e-4


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_greedy_32_tokens_match_transformers(family, checkpoints, references):
    ours = session_for(checkpoints[family]).generate(PROMPT[:6], 32)
    assert ours == reference_greedy(references[family], PROMPT[:6], 32)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_prefill_then_decode_equals_full_recompute(family, checkpoints):
    session = session_for(checkpoints[family])
    full = session.prefill(PROMPT, all_logits=True)
    session.reset()
    steps = [session.prefill(PROMPT[:7])]
    steps += [session.decode(t) for t in PROMPT[7:]]
    assert session.position == len(PROMPT)
    np.testing.assert_allclose(np.stack(steps), full[6:], atol=1e-5, rtol=0)


def test_chunked_prefill_equals_single_prefill(checkpoints):
    session = session_for(checkpoints["e"])
    full = session.prefill(PROMPT, all_logits=True)
    session.reset()
    first = session.prefill(PROMPT[:9], all_logits=True)
    second = session.prefill(PROMPT[9:], all_logits=True)
    np.testing.assert_allclose(np.concatenate([first, second]), full, atol=1e-5, rtol=0)


def test_sharded_and_multimodal_layouts_give_the_same_logits(checkpoints, tmp_path):
    """A sharded checkpoint and a `model.language_model.` (Gemma4Config-wrapped) one load identically."""
    import json

    from hf_reference import load_reference
    from safetensors.numpy import load_file, save_file

    src = checkpoints["e"]
    model = load_reference(src)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()

    wrapped = tmp_path / "wrapped"
    wrapped.mkdir()
    text = json.loads((src / "config.json").read_text())
    (wrapped / "config.json").write_text(json.dumps({"model_type": "gemma4", "text_config": text,
                                                     "vision_config": None, "tie_word_embeddings": True}))
    tensors = load_file(str(src / "model.safetensors"))
    renamed = {k.replace("model.", "model.language_model.", 1): v for k, v in tensors.items()}
    renamed["model.vision_tower.patch.weight"] = np.zeros((2, 2), np.float32)  # other towers are ignored
    save_file(renamed, str(wrapped / "model.safetensors"))

    expected = session_for(src).prefill(PROMPT, all_logits=True)
    for path in (tmp_path / "sharded", wrapped):
        np.testing.assert_array_equal(session_for(path).prefill(PROMPT, all_logits=True), expected)
