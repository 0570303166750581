"""fp16/bf16 weight storage, checked tightly: an artifact compiled with `dtype=float16/bfloat16` from an
fp32 checkpoint equals transformers run in fp32 on the SAME rounded weights.

g4c stores every matrix (embedding, PLE table, projections, experts, router; ≥ 2-D tensors) in the
half type and computes in fp32, keeping the 1-D tensors (norm scales, layer_scalar, router scales)
in fp32. Rounding exactly those tensors of the checkpoint (round to nearest even, as numpy/ml_dtypes
and torch both do) and back to fp32 gives a model transformers computes in fp32 that the artifact
must match to fp32 accuracy: 1e-4 on logits of magnitude ~1-10, the bound of every fp32 parity test.
Rounding moves the logits by far more than that (asserted below: > 1e-3), so an artifact that kept
fp32 weights, rounded differently or dropped an op (the softcap) fails."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PROMPT
from hf_reference import load_reference, reference_greedy, reference_logits

from g4c.compiler import compile_model
from g4c.model import load_model
from g4c.runtime import load

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def rounded_reference(checkpoint, dtype: str, directory):
    """transformers (fp32) on the checkpoint's ≥ 2-D weights rounded to `dtype` and back, saved and reloaded."""
    model = load_reference(checkpoint)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(p.to(TORCH_DTYPES[dtype]).to(torch.float32))
    model.save_pretrained(directory)
    return load_reference(directory)


@pytest.mark.parametrize("family, dtype", [("e", "float16"), ("e", "bfloat16"), ("moe", "float16"),
                                           ("moe", "bfloat16")])
def test_half_weights_match_transformers_on_the_same_rounded_weights(family, dtype, checkpoints, references,
                                                                     tmp_path):
    loaded = load_model(str(checkpoints[family]))  # the fp32 checkpoint: g4c rounds it itself
    art = compile_model(loaded.cfg, loaded.weights, "llvm", tmp_path / "art", dtype=dtype)
    reference = rounded_reference(checkpoints[family], dtype, tmp_path / "rounded")
    expected = reference_logits(reference, PROMPT)
    assert np.abs(expected - reference_logits(references[family], PROMPT)).max() > 1e-3  # rounding is visible
    session = load(art, prefill_chunk=7)
    assert np.abs(session.prefill(PROMPT, all_logits=True) - expected).max() <= 1e-4
    session.reset()
    assert session.generate(PROMPT[:6], 24) == reference_greedy(reference, PROMPT[:6], 24)
