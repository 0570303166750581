"""The audio encoder graph (`g4c.audio`) against transformers' `Gemma4AudioModel` + `embed_audio`.

Tiny random towers (every parameter and clip buffer randomised, finite clip bounds on some linears so
clamping happens) are saved under the multimodal checkpoint keys, read back through `TowerCheckpoint`,
and run with the reference interpreter. transformers in float64 is the reference: g4c's fp32 error
must stay within max(1e-4, 2 × transformers' own fp32 error) on the same clip. transformers upcasts
to fp32 in its norms and attention (`.float()`, `softmax(dtype=float32)`), which in a float64 run
rounds to fp32 (and mixes dtypes in the attention), so the float64 run keeps float64 there.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import Gemma4AudioConfig, Gemma4TextConfig
from transformers.models.gemma4.modeling_gemma4 import (Gemma4AudioModel, Gemma4ClippableLinear,
                                                        Gemma4MultimodalEmbedder)

from g4c.audio import (AudioTowerConfig, audio_graph_inputs, audio_num_soft_tokens, audio_tower_shapes,
                       build_audio_graph)
from g4c.errors import ConfigError
from g4c.ir import Interpreter, verify
from g4c.weights import TowerCheckpoint

TEXT_HIDDEN = 40
N_MELS = 8  # input_proj_linear fixes the mel bins: ceil(ceil(M/2)/2) = subsampling_conv_channels[0] // 4
FRAMES = (9, 24, 37)
BASE: dict[str, Any] = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            subsampling_conv_channels=[8, 4], attention_chunk_size=4, attention_context_left=5,
                            attention_context_right=0, conv_kernel_size=3, output_proj_dims=24)
CASES: dict[str, dict[str, Any]] = {
    "left": {},  # the released layout: past context only
    # future context, a gradient clip that bites, a non-default eps (the norms that ignore it stay 1e-6)
    "right": dict(attention_context_right=2, gradient_clipping=1.0, rms_norm_eps=1e-3),
    "unclipped": dict(use_clipped_linears=False, attention_chunk_size=3, attention_context_left=2),
}
# Clip bounds cycled over the clippable linears: none, tight symmetric, asymmetric.
BOUNDS = ((-math.inf, math.inf), (-0.5, 0.5), (-0.8, 0.3))


@dataclass
class Tower:
    case: str
    cfg: AudioTowerConfig
    hf32: tuple[torch.nn.Module, torch.nn.Module]
    hf64: tuple[torch.nn.Module, torch.nn.Module]
    weights: TowerCheckpoint


def _randomize(modules: tuple[torch.nn.Module, ...], seed: int) -> None:
    """Matrices ~ N(0, 1/fan_in) (activations stay O(1), so the ±0.5 clip bounds bite), scales
    around 1, per_dim_scale and the bias around 0, clip bounds cycled through BOUNDS."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, t in module.named_parameters():
                if t.dim() >= 2:
                    t.copy_(torch.randn(t.shape, generator=gen) / math.sqrt(t[0].numel()))
                elif name.endswith(("per_dim_scale", "bias")):
                    t.copy_(0.5 * torch.randn(t.shape, generator=gen))
                else:
                    t.copy_(1.0 + 0.5 * (torch.rand(t.shape, generator=gen) - 0.5))
            clipped = [m for m in module.modules() if isinstance(m, Gemma4ClippableLinear) and m.use_clipped_linears]
            for i, m in enumerate(clipped):
                (in_lo, in_hi), (out_lo, out_hi) = BOUNDS[i % 3], BOUNDS[(i // 3) % 3]
                for buf, value in zip(("input_min", "input_max", "output_min", "output_max"),
                                      (in_lo, in_hi, out_lo, out_hi)):
                    getattr(m, buf).fill_(value)


def _save(directory: Path, audio: torch.nn.Module, embed: torch.nn.Module) -> Path:
    tensors = {f"model.audio_tower.{k}": v.contiguous() for k, v in audio.state_dict().items()}
    tensors.update({f"model.embed_audio.{k}": v.contiguous() for k, v in embed.state_dict().items()})
    tensors["model.language_model.embed_tokens.weight"] = torch.zeros(4, TEXT_HIDDEN)  # not a tower tensor
    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


@pytest.fixture(scope="module", params=list(CASES))
def tower(request, tmp_path_factory) -> Tower:
    hf_cfg = Gemma4AudioConfig(**{**BASE, **CASES[request.param]})
    torch.manual_seed(0)
    audio = Gemma4AudioModel(hf_cfg).eval()
    embed = Gemma4MultimodalEmbedder(hf_cfg, Gemma4TextConfig(hidden_size=TEXT_HIDDEN)).eval()
    _randomize((audio, embed), seed=list(CASES).index(request.param) + 1)
    directory = _save(tmp_path_factory.mktemp("audio") / request.param, audio, embed)
    cfg = AudioTowerConfig.from_dict({**hf_cfg.to_dict(), "input_feat_size": N_MELS})
    weights = TowerCheckpoint(directory, towers=("audio_tower", "embed_audio"))
    hf64 = (copy.deepcopy(audio).double(), copy.deepcopy(embed).double())
    return Tower(request.param, cfg, (audio, embed), hf64, weights)


def _features(frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((frames, N_MELS))


@contextlib.contextmanager
def _float64_stays_float64():
    """transformers' fp32 upcasts (`Tensor.float()`, `softmax(dtype=torch.float32)`) leave float64
    tensors alone while active; float32 runs are unaffected."""
    tensor_float, softmax = torch.Tensor.float, torch.nn.functional.softmax

    def keep_float(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else tensor_float(self, *args, **kwargs)

    def keep_softmax(x, *args, dtype=None, **kwargs):
        return softmax(x, *args, dtype=None if x.dtype == torch.float64 else dtype, **kwargs)

    with mock.patch.object(torch.Tensor, "float", keep_float), \
            mock.patch.object(torch.nn.functional, "softmax", keep_softmax):
        yield


def _transformers(models, features: np.ndarray, dtype: torch.dtype, mask: np.ndarray | None = None):
    """`Gemma4Model.get_audio_features` for a batch [B, T, M] (one unpadded clip: mask all valid)."""
    audio, embed = models
    x = torch.tensor(features, dtype=dtype)
    x = x[None] if x.dim() == 2 else x
    mask = torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else torch.tensor(mask)
    with torch.no_grad(), _float64_stays_float64():
        out = audio(x, mask)
        return embed(out.last_hidden_state).numpy(), out.attention_mask.numpy()


def _g4c(tower: Tower, features: np.ndarray, return_all: bool = False) -> dict[str, np.ndarray]:
    graph = build_audio_graph(tower.cfg, TEXT_HIDDEN)
    weights = tower.weights
    return Interpreter(graph, lambda n: weights.get(n)).run(return_all=return_all, **audio_graph_inputs(features))


@pytest.mark.parametrize("frames", FRAMES)
def test_embeddings_match_transformers(tower, frames):
    features = _features(frames, seed=frames)
    expected, mask = _transformers(tower.hf64, features, torch.float64)
    hf32, _ = _transformers(tower.hf32, features, torch.float32)
    ours = _g4c(tower, features.astype(np.float32))["embeddings"]
    assert mask.all() and int(mask.sum()) == audio_num_soft_tokens(frames)
    assert ours.shape == (audio_num_soft_tokens(frames), TEXT_HIDDEN) == expected.shape[1:]
    err, hf_err = np.abs(ours - expected[0]).max(), np.abs(hf32[0] - expected[0]).max()
    print(f"{tower.case} {frames} frames: g4c fp32 {err:.2e}, transformers fp32 {hf_err:.2e}")
    assert err <= max(1e-4, 2 * hf_err)


def test_clip_bounds_and_gradient_clipping_bite(tower):
    """Some clamps change values (finite checkpoint bounds), so the comparison above covers them."""
    graph = build_audio_graph(tower.cfg, TEXT_HIDDEN)
    values = _g4c(tower, _features(24).astype(np.float32), return_all=True)
    changed = {n.op for n in graph.nodes if n.op in ("clamp", "clip")
               and not np.array_equal(values[n.name], values[n.inputs[0].name])}
    assert changed == ({"clamp"} if tower.cfg.use_clipped_linears else set()) | (
        {"clip"} if tower.cfg.gradient_clipping < 1e9 else set())


def test_one_clip_equals_its_rows_of_a_padded_batch(tower):
    """transformers masks padded frames: a clip padded into a batch gives, on its valid frames, what it
    gives alone; so one unpadded clip (every frame valid, no mask in the graph) is exact."""
    long, short = _features(37, seed=1), _features(22, seed=2)
    batch = np.stack([long, np.concatenate([short, np.full((15, N_MELS), 3.0)])])
    mask = np.arange(37)[None] < np.array([[37], [22]])
    padded, out_mask = _transformers(tower.hf64, batch, torch.float64, mask)
    alone, _ = _transformers(tower.hf64, short, torch.float64)
    valid = audio_num_soft_tokens(22)
    assert out_mask.sum(axis=1).tolist() == [audio_num_soft_tokens(37), valid]
    np.testing.assert_allclose(padded[1, :valid], alone[0], rtol=0, atol=1e-6)


def test_soft_token_count_matches_transformers_mask():
    conv = Gemma4AudioModel(Gemma4AudioConfig(**BASE)).subsample_conv_projection
    for frames in range(1, 41):
        with torch.no_grad():
            _, mask = conv(torch.zeros(1, frames, N_MELS), torch.ones(1, frames, dtype=torch.bool))
        assert audio_num_soft_tokens(frames) == int(mask.sum()) == mask.shape[1]


def test_graph_verifies_and_reads_exactly_the_checkpoint(tower):
    graph = build_audio_graph(tower.cfg, TEXT_HIDDEN)
    verify(graph)
    assert graph.name == "gemma4_encode_audio" and graph.meta == {"mode": "encode_audio"}
    assert [(n.attrs["name"], n.type.shape) for n in graph.inputs] == [
        ("features", ("T", N_MELS)), ("conv0_frames", ("T1",)), ("frames", ("S",))]
    assert graph.outputs["embeddings"].type.shape == ("S", TEXT_HIDDEN)
    shapes = audio_tower_shapes(tower.cfg, TEXT_HIDDEN)
    assert {n: tower.weights.shape(n) for n in tower.weights.names()} == shapes
    assert {n.attrs["name"] for n in graph.params} == set(shapes)


def test_default_config_builds_and_verifies():
    cfg = AudioTowerConfig.from_dict(Gemma4AudioConfig().to_dict())
    assert (cfg.n_mels, cfg.mel_bins_out, cfg.context_size) == (128, 32, 24)
    assert AudioTowerConfig.from_dict(cfg.to_dict()) == cfg
    verify(build_audio_graph(cfg, 1536))


@pytest.mark.parametrize("edit, message", [
    (dict(hidden_size=-4), r"audio_config\.hidden_size: expected a positive integer, got -4"),
    (dict(num_attention_heads=5), r"hidden_size: 32 is not divisible by 5 attention heads"),
    (dict(hidden_act="gelu"), r"audio_config\.hidden_act: 'gelu' is not supported"),
    (dict(subsampling_conv_channels=[8]), r"subsampling_conv_channels: expected two channel counts"),
    (dict(input_feat_size=128), r"128 mel bins leave 32 after the two stride-2 convolutions, but .* = 2"),
    (dict(attention_context_left=0), r"attention_context_left: expected a positive integer, got 0"),
    (dict(attention_context_right=-1), r"attention_context_right: expected an integer ≥ 0, got -1"),
    (dict(attention_logit_cap=0.0), r"attention_logit_cap: expected a positive number"),
    (dict(use_clipped_linears="yes"), r"use_clipped_linears: expected true or false"),
    (dict(model_type="gemma3n_audio"), r"model_type: 'gemma3n_audio', expected 'gemma4_audio'"),
])
def test_bad_config_values_raise_one_line_errors(edit, message):
    raw = {**Gemma4AudioConfig(**BASE).to_dict(), "input_feat_size": N_MELS, **edit}
    with pytest.raises(ConfigError, match=message):
        AudioTowerConfig.from_dict(raw)
