"""The Gemma 4 audio encoder (USM conformer) as a g4c graph: one clip's log-mel frames → soft tokens.

`build_audio_graph(cfg, text_hidden)` follows transformers' `Gemma4AudioModel` + `embed_audio`
(`Gemma4Model.get_audio_features`) for one clip of T mel frames, every frame valid:

    x = relu(LayerNorm(conv3x3/2(features)))  twice          [T, M, 1] → [T1, M/2, C0] → [S, M/4, C1]
    x = flatten(x) @ W_in                                     [S, H]
    per layer (clip(·) = clamp to ±gradient_clipping, Linear* = clamp → linear → clamp with the
               checkpoint's input/output bounds when use_clipped_linears):
        x = x + w_res · RMSNorm(clip(Linear*(silu(Linear*(RMSNorm(clip(x)))))))    feed_forward1
        q, k, v = Linear*(RMSNorm(clip(x))) · (q_scale·softplus(per_dim_scale), k_scale, 1)
        x = x + RMSNorm(clip(Linear*(local_attention(q, k, v, rel_pos @ W_rel))))
        x = x + Linear*(silu(RMSNorm(clip(causal_dwconv(glu(Linear*(RMSNorm(x))))))))  lconv1d
        x = x + w_res · RMSNorm(clip(…))                                                feed_forward2
        x = RMSNorm(clip(x))
    embeddings = RMSNorm₀(x @ W_out + b_out) @ W_proj        [S, text hidden]

transformers masks padded frames (the convolutions' inputs, the attention's keys); for one clip
without padding every frame is valid, so running its T frames computes the same values. The chunked
attention's own padding of the last block is part of `local_attention`.

Inputs (fill them with `audio_graph_inputs`, or from a preprocessed clip with
`g4c.runtime.media.audio_encoder_inputs`, which sessions use): `features` [T, n_mels] float32 (the
feature extractor's log-mel frames of the clip, no padding rows), and two int64 ranges that only carry lengths, as the IR
has no symbolic arithmetic: `conv0_frames` [T1] = arange(ceil(T/2)) (the rows after the first
convolution) and `frames` [S] = arange(audio_num_soft_tokens(T)). Output `embeddings` [S, text_hidden].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from g4c.errors import ConfigError
from g4c.ir.graph import Graph, Node
from g4c.runtime.media import audio_feature_inputs

PREFIX = "audio_tower."
EMBED = "embed_audio."
INPUTS = ("features", "conv0_frames", "frames")
CLIP_BUFFERS = ("input_min", "input_max", "output_min", "output_max")
DEFAULT_NORM_EPS = 1e-6  # transformers builds the layers' norms (all but lconv1d's) without the config's eps
ACTIVATIONS = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu_pytorch_tanh": "gelu_tanh"}
F32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class AudioTowerConfig:
    """The audio tower's hyper-parameters (transformers' `Gemma4AudioConfig` names and defaults).

    `n_mels` is not in transformers' audio config: the feature extractor's `feature_size` (128). The
    subsampling's projection fixes it (M/4 frequency bins times C1 channels must be (C0 // 4)·C1);
    `from_dict` reads it from `input_feat_size` when present (Gemma 3n's name), which `to_dict` writes."""

    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "silu"
    subsampling_conv_channels: tuple[int, int] = (128, 32)
    conv_kernel_size: int = 5
    residual_weight: float = 0.5
    attention_chunk_size: int = 12
    attention_context_left: int = 13
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1.0e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    output_proj_dims: int = 1536
    n_mels: int = 128

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AudioTowerConfig:
        if not isinstance(raw, dict):
            raise ConfigError("audio_config: expected a JSON object")
        if raw.get("model_type", "gemma4_audio") != "gemma4_audio":
            raise ConfigError(f"audio_config.model_type: {raw['model_type']!r}, expected 'gemma4_audio'")
        known = {f.name: raw[f.name] for f in fields(cls) if raw.get(f.name) is not None}
        if raw.get("input_feat_size") is not None:
            known["n_mels"] = raw["input_feat_size"]
        channels = known.get("subsampling_conv_channels")
        if channels is not None:
            if not isinstance(channels, (list, tuple)) or len(channels) != 2:
                raise ConfigError(f"audio_config.subsampling_conv_channels: expected two channel counts, "
                                  f"got {channels!r}")
            known["subsampling_conv_channels"] = tuple(channels)
        cfg = cls(**known)
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "conv_kernel_size",
                     "attention_chunk_size", "attention_context_left", "output_proj_dims", "n_mels"):
            _positive_int(name, getattr(self, name))
        _positive_int("attention_context_right", self.attention_context_right, minimum=0)
        for i, c in enumerate(self.subsampling_conv_channels):
            _positive_int(f"subsampling_conv_channels[{i}]", c)
        for name in ("residual_weight", "attention_logit_cap", "attention_invalid_logits_value",
                     "rms_norm_eps", "gradient_clipping"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
                raise ConfigError(f"audio_config.{name}: expected a number, got {value!r}")
        for name in ("attention_logit_cap", "rms_norm_eps", "gradient_clipping"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"audio_config.{name}: expected a positive number, got {getattr(self, name)!r}")
        if not isinstance(self.use_clipped_linears, bool):
            raise ConfigError(f"audio_config.use_clipped_linears: expected true or false, got {self.use_clipped_linears!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"audio_config.hidden_act: {self.hidden_act!r} is not supported "
                              f"(expected one of {', '.join(ACTIVATIONS)})")
        if self.hidden_size % 2:
            raise ConfigError(f"audio_config.hidden_size: {self.hidden_size} must be even (sin/cos positions)")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"audio_config.hidden_size: {self.hidden_size} is not divisible by "
                              f"{self.num_attention_heads} attention heads")
        if self.mel_bins_out != self.subsampling_conv_channels[0] // 4:
            raise ConfigError(f"audio_config: {self.n_mels} mel bins leave {self.mel_bins_out} after the two stride-2 "
                              f"convolutions, but input_proj_linear expects subsampling_conv_channels[0] // 4 = "
                              f"{self.subsampling_conv_channels[0] // 4} (set input_feat_size to the feature size)")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["subsampling_conv_channels"] = list(self.subsampling_conv_channels)
        out["input_feat_size"] = out.pop("n_mels")
        return {"model_type": "gemma4_audio", **out}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def context_size(self) -> int:
        """Keys per attention block: the chunk, context_left - 1 rows before it, context_right after."""
        return self.attention_chunk_size + self.attention_context_left - 1 + self.attention_context_right

    @property
    def mel_bins_out(self) -> int:
        """Frequency bins left by the two stride-2 convolutions."""
        return _conv_out(_conv_out(self.n_mels))


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"
        raise ConfigError(f"audio_config.{name}: expected {what}, got {value!r}")


def _conv_out(size: int) -> int:
    """Output length of the subsampling's kernel-3, stride-2, padding-1 convolution."""
    return (size + 2 - 3) // 2 + 1


def audio_num_soft_tokens(frames: int) -> int:
    """Soft tokens (encoder outputs) for a clip of `frames` mel frames: ceil(ceil(T/2)/2)."""
    return _conv_out(_conv_out(frames)) if frames > 0 else 0


def audio_graph_inputs(features: np.ndarray) -> dict[str, np.ndarray]:
    """The graph's inputs for one clip's features [T, n_mels] (`g4c.runtime.media.audio_feature_inputs`,
    which sessions call through `audio_encoder_inputs`)."""
    return audio_feature_inputs(features)


def audio_tower_shapes(cfg: AudioTowerConfig, text_hidden: int) -> dict[str, tuple[int, ...]]:
    """Every tensor the audio tower and its projection read (checkpoint key minus `model.`)."""
    H, (c0, c1), K = cfg.hidden_size, cfg.subsampling_conv_channels, cfg.conv_kernel_size
    sub = f"{PREFIX}subsample_conv_projection."
    shapes = {f"{sub}layer0.conv.weight": (c0, 1, 3, 3), f"{sub}layer0.norm.weight": (c0,),
              f"{sub}layer1.conv.weight": (c1, c0, 3, 3), f"{sub}layer1.norm.weight": (c1,),
              f"{sub}input_proj_linear.weight": (H, (c0 // 4) * c1)}
    for i in range(cfg.num_hidden_layers):
        p = f"{PREFIX}layers.{i}."
        linears = {f"{p}feed_forward{f}.ffw_layer_1": (4 * H, H) for f in (1, 2)}
        linears.update({f"{p}feed_forward{f}.ffw_layer_2": (H, 4 * H) for f in (1, 2)})
        linears.update({f"{p}self_attn.{n}": (H, H) for n in ("q_proj", "k_proj", "v_proj", "post")})
        linears.update({f"{p}lconv1d.linear_start": (2 * H, H), f"{p}lconv1d.linear_end": (H, H)})
        for name, shape in linears.items():
            shapes[f"{name}.linear.weight"] = shape
            if cfg.use_clipped_linears:
                shapes.update({f"{name}.{b}": () for b in CLIP_BUFFERS})
        shapes.update({f"{p}self_attn.relative_k_proj.weight": (H, H), f"{p}self_attn.per_dim_scale": (cfg.head_dim,),
                       f"{p}lconv1d.depthwise_conv1d.weight": (H, 1, K)})
        norms = [f"feed_forward{f}.{n}" for f in (1, 2) for n in ("pre_layer_norm", "post_layer_norm")]
        norms += ["lconv1d.pre_layer_norm", "lconv1d.conv_norm", "norm_pre_attn", "norm_post_attn", "norm_out"]
        shapes.update({f"{p}{n}.weight": (H,) for n in norms})
    shapes.update({f"{PREFIX}output_proj.weight": (cfg.output_proj_dims, H),
                   f"{PREFIX}output_proj.bias": (cfg.output_proj_dims,),
                   f"{EMBED}embedding_projection.weight": (text_hidden, cfg.output_proj_dims)})
    return shapes


class FiniteClipBounds:
    """A tower weight source with the clippable linears' bounds (`input_min` … `output_max`) made finite:
    transformers initialises them to ±inf, which a checkpoint without clipping keeps, and the compiler
    refuses non-finite weights. ±fp32 max clamps every finite value as ±inf does (NaN stays NaN)."""

    def __init__(self, source):
        self.source = source

    def __getattr__(self, name: str):
        return getattr(self.source, name)

    def names(self) -> list[str]:
        return self.source.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(name)

    def dtype(self, name: str) -> str:
        return self.source.dtype(name)

    def get(self, name: str) -> np.ndarray:
        value = self.source.get(name)
        if name.startswith(PREFIX) and name.rsplit(".", 1)[-1] in CLIP_BUFFERS:
            return np.clip(np.asarray(value, dtype=np.float32), -F32_MAX, F32_MAX)
        return value


class _Builder:
    """Small helpers so the tower below reads like the math."""

    def __init__(self, cfg: AudioTowerConfig, text_hidden: int):
        self.cfg, self.g = cfg, Graph("gemma4_encode_audio", meta={"mode": "encode_audio"})
        self.shapes = audio_tower_shapes(cfg, text_hidden)

    def w(self, name: str) -> Node:
        return self.g.param(name, self.shapes[name], "float32")

    def norm(self, x: Node, weight: str | None, name: str, eps: float = DEFAULT_NORM_EPS) -> Node:
        inputs = (x, self.w(weight)) if weight else (x,)
        return self.g.call("rms_norm", *inputs, eps=eps, name=name)

    def linear(self, x: Node, module: str, name: str) -> Node:
        """`Gemma4ClippableLinear`: clamp the input and the output to the checkpoint's bounds."""
        if self.cfg.use_clipped_linears:
            x = self.g.call("clamp", x, self.w(f"{module}.input_min"), self.w(f"{module}.input_max"),
                            name=f"{name}_in")
        y = self.g.call("linear", x, self.w(f"{module}.linear.weight"), name=name)
        if self.cfg.use_clipped_linears:
            y = self.g.call("clamp", y, self.w(f"{module}.output_min"), self.w(f"{module}.output_max"),
                            name=f"{name}_out")
        return y

    def clip(self, x: Node, name: str) -> Node:
        """transformers' `gradient_clipping` clamp (at most the fp32 range: a bound beyond it changes
        no finite value, so none is emitted)."""
        limit = self.cfg.gradient_clipping
        return self.g.call("clip", x, limit=float(limit), name=name) if limit < F32_MAX else x

    def act(self, x: Node, name: str) -> Node:
        return self.g.call(ACTIVATIONS[self.cfg.hidden_act], x, name=name)


def build_audio_graph(cfg: AudioTowerConfig, text_hidden: int) -> Graph:
    """One clip's T mel frames → its S soft tokens in the text width (see the module docstring)."""
    b = _Builder(cfg, text_hidden)
    g = b.g
    features = g.input("features", ("T", cfg.n_mels), "float32")
    conv0_frames = g.input("conv0_frames", ("T1",), "int64")
    frames = g.input("frames", ("S",), "int64")

    x = g.call("reshape", features, shape=("T", cfg.n_mels, 1), name="features_nhwc")
    x = _subsample_layer(b, x, conv0_frames, 0)
    x = _subsample_layer(b, x, frames, 1)
    x = g.call("reshape", x, shape=("S", cfg.mel_bins_out * cfg.subsampling_conv_channels[1]), name="sub_flat")
    x = g.call("linear", x, b.w(f"{PREFIX}subsample_conv_projection.input_proj_linear.weight"), name="sub_proj")

    rel = g.call("rel_positions", count=cfg.context_size // 2 + 1, dim=cfg.hidden_size, name="rel_positions")
    for i in range(cfg.num_hidden_layers):
        x = _conformer_layer(b, i, x, rel)

    x = g.call("linear", x, b.w(f"{PREFIX}output_proj.weight"), name="out_proj")
    x = g.call("add_channels", x, b.w(f"{PREFIX}output_proj.bias"), name="out_proj_bias")
    x = b.norm(x, None, name="embed_norm", eps=cfg.rms_norm_eps)
    g.output("embeddings", g.call("linear", x, b.w(f"{EMBED}embedding_projection.weight"), name="embed_proj"))
    return g


def _subsample_layer(b: _Builder, x: Node, rows: Node, i: int) -> Node:
    """conv 3×3 stride 2 (no bias) → LayerNorm over channels (no bias) → ReLU, channels last."""
    g, p = b.g, f"{PREFIX}subsample_conv_projection.layer{i}."
    x = g.call("conv2d", x, b.w(f"{p}conv.weight"), rows, stride=2, padding=1, name=f"sub{i}_conv")
    x = g.call("layer_norm", x, b.w(f"{p}norm.weight"), eps=b.cfg.rms_norm_eps, name=f"sub{i}_norm")
    return g.call("relu", x, name=f"sub{i}_relu")


def _conformer_layer(b: _Builder, i: int, x: Node, rel: Node) -> Node:
    g, p = b.g, f"{PREFIX}layers.{i}."
    x = _feed_forward(b, x, f"{p}feed_forward1.", f"a{i}_ff1")
    h = b.norm(b.clip(x, f"a{i}_attn_clip"), f"{p}norm_pre_attn.weight", name=f"a{i}_attn_in")
    a = _attention(b, i, h, rel)
    a = b.norm(b.clip(a, f"a{i}_attn_out_clip"), f"{p}norm_post_attn.weight", name=f"a{i}_attn_post")
    x = g.call("add", x, a, name=f"a{i}_attn_res")
    x = _light_conv(b, x, f"{p}lconv1d.", f"a{i}_conv")
    x = _feed_forward(b, x, f"{p}feed_forward2.", f"a{i}_ff2")
    return b.norm(b.clip(x, f"a{i}_out_clip"), f"{p}norm_out.weight", name=f"a{i}_out")


def _feed_forward(b: _Builder, x: Node, p: str, tag: str) -> Node:
    g = b.g
    h = b.norm(b.clip(x, f"{tag}_clip_in"), f"{p}pre_layer_norm.weight", name=f"{tag}_in")
    h = b.act(b.linear(h, f"{p}ffw_layer_1", name=f"{tag}_up"), name=f"{tag}_act")
    h = b.linear(h, f"{p}ffw_layer_2", name=f"{tag}_down")
    h = b.norm(b.clip(h, f"{tag}_clip_out"), f"{p}post_layer_norm.weight", name=f"{tag}_post")
    h = g.call("scale", h, value=b.cfg.residual_weight, name=f"{tag}_scaled")
    return g.call("add", x, h, name=f"{tag}_res")


def _attention(b: _Builder, i: int, h: Node, rel: Node) -> Node:
    g, cfg, p = b.g, b.cfg, f"{PREFIX}layers.{i}.self_attn."
    nh, hd = cfg.num_attention_heads, cfg.head_dim

    def heads(proj: str, scale: float) -> Node:  # scaled as rows [S, H] (what the lowering's `scale` takes)
        y = b.linear(h, f"{p}{proj}", name=f"a{i}_{proj[0]}")
        y = g.call("scale", y, value=scale, name=f"a{i}_{proj[0]}_scaled")
        return g.call("reshape", y, shape=("S", nh, hd), name=f"a{i}_{proj[0]}_heads")

    q = heads("q_proj", hd ** -0.5 / math.log(2))
    per_dim = g.call("softplus", b.w(f"{p}per_dim_scale"), name=f"a{i}_per_dim_scale")  # a weight recipe when compiled
    q = g.call("mul_channels", q, per_dim, name=f"a{i}_q_dim_scaled")
    k = heads("k_proj", math.log(1 + math.e) / math.log(2))
    v = b.linear(h, f"{p}v_proj", name=f"a{i}_v")
    v = g.call("reshape", v, shape=("S", nh, hd), name=f"a{i}_v_heads")
    rel_k = g.call("linear", rel, b.w(f"{p}relative_k_proj.weight"), name=f"a{i}_rel_k")
    rel_k = g.call("reshape", rel_k, shape=(cfg.context_size // 2 + 1, nh, hd), name=f"a{i}_rel_k_heads")
    a = g.call("local_attention", q, k, v, rel_k, chunk=cfg.attention_chunk_size,
               context_left=cfg.attention_context_left, context_right=cfg.attention_context_right,
               softcap=cfg.attention_logit_cap, invalid_logit=cfg.attention_invalid_logits_value, name=f"a{i}_attn")
    a = g.call("reshape", a, shape=("S", nh * hd), name=f"a{i}_attn_flat")
    return b.linear(a, f"{p}post", name=f"a{i}_o")


def _light_conv(b: _Builder, x: Node, p: str, tag: str) -> Node:
    """`Gemma4AudioLightConv1d`: GLU, causal depthwise conv, norm, activation, projection, residual."""
    g, eps = b.g, b.cfg.rms_norm_eps
    h = b.norm(x, f"{p}pre_layer_norm.weight", name=f"{tag}_in", eps=eps)
    h = g.call("glu", b.linear(h, f"{p}linear_start", name=f"{tag}_start"), name=f"{tag}_glu")
    h = g.call("depthwise_conv1d", h, b.w(f"{p}depthwise_conv1d.weight"), name=f"{tag}_dw")
    h = b.norm(b.clip(h, f"{tag}_clip"), f"{p}conv_norm.weight", name=f"{tag}_norm", eps=eps)
    h = b.linear(b.act(h, name=f"{tag}_act"), f"{p}linear_end", name=f"{tag}_end")
    return g.call("add", x, h, name=f"{tag}_res")
