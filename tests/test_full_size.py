"""Real layer sizes (slow): E2B and 26B-A4B presets cut to a few layers, written by `g4c init-random`,
compared with transformers on a prompt longer than the sliding window.

At real widths, random weights and 600 positions, fp32 rounding differences between any two
implementations grow to ~1e-3 in the logits (q·k with normalised q/k and scaling 1.0 makes softmax
sharp), so the bound here is relative to transformers' own fp32 error: both are measured against
transformers in float64, and g4c must be within 2.5× of transformers' fp32 error (wrong semantics
give errors of order 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_reference import load_reference, reference_logits
from transformers import AutoModelForCausalLM

from g4c.checkpoint import write_random_checkpoint
from g4c.model import load_model
from g4c.presets import preset_config
from g4c.reference import ReferenceSession


@pytest.mark.slow
@pytest.mark.parametrize("preset, layers, prompt_len", [("e2b", 6, 600), ("26b-a4b", 2, 40)])
def test_full_size_layers_match_transformers(preset, layers, prompt_len, tmp_path):
    path = write_random_checkpoint(preset_config(preset, layers), tmp_path / preset, seed=1, dtype="bfloat16")
    prompt = np.random.default_rng(0).integers(0, 262_144, size=prompt_len).tolist()
    torch_fp32 = reference_logits(load_reference(path), prompt)
    fp64 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="eager",
                                                experts_implementation="eager").eval()
    exact = reference_logits(fp64, prompt).astype(np.float64)
    del fp64
    loaded = load_model(str(path))
    session = ReferenceSession(loaded.cfg, loaded.weights)
    ours = session.prefill(prompt, all_logits=True)
    torch_error = np.abs(torch_fp32 - exact).max()
    assert np.abs(ours - exact).max() <= 2.5 * torch_error + 1e-5
    session.reset()
    session.prefill(prompt[:-1])
    assert np.abs(session.decode(prompt[-1]) - exact[-1]).max() <= 2.5 * torch_error + 1e-5
