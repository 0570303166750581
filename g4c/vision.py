"""The Gemma 4 vision encoder as a g4c graph: one image's patches → soft tokens in the text width.

`build_vision_graph(cfg, text_hidden)` follows transformers' `Gemma4VisionModel` + `embed_vision`
(`Gemma4Model.get_image_features`) for one image of T patches (no padding rows):

    x = patches @ W_in + pos_x_table[x] + pos_y_table[y]            patches = 2·(pixel_values − 0.5)
    per layer: h = RMSNorm(x)
               q, k = axial_rope(RMSNorm(h W_q), (x, y)), axial_rope(RMSNorm(h W_k), (x, y)); v = RMSNorm₀(h W_v)
               x += RMSNorm(o_proj(attention(q, k, v)))           bidirectional: every patch sees all T
               x += RMSNorm(down(gelu(gate(RMSNorm(x))) · up(…)))
    soft = mean of each k×k window of patches (`pool`) · √H_vision
    embeddings = RMSNorm₀(soft) @ W_proj                            [S, text hidden]

transformers pads every image to `max_soft_tokens·k²` patches and masks the padding out of attention
and pooling; running the T real patches only computes the same values. The attention is the IR's
`attention` with `reach`: keys at positions 0..T-1, every query reaching position T-1.

Inputs (filled by the runtime from `g4c.media.ImageInputs`): `patches` [T, 3·p²] float32,
`patch_positions` [T, 2] and `patch_x`, `patch_y` [T] (the (x, y) patch coordinates), `positions` [T]
(0..T-1) and `reach` [T] (all T-1) for the attention, `pool` [S, k²] (the patches of each soft token).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from g4c.errors import ConfigError
from g4c.ir.graph import Graph, Node

PREFIX = "vision_tower."
EMBED = "embed_vision."
INPUTS = ("patches", "patch_positions", "patch_x", "patch_y", "positions", "reach", "pool")


@dataclass(frozen=True)
class VisionTowerConfig:
    """The vision tower's hyper-parameters (transformers' `Gemma4VisionConfig` names)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100.0
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VisionTowerConfig:
        if not isinstance(raw, dict):
            raise ConfigError("vision_config: expected a JSON object")
        _refuse(raw, "hidden_activation", "gelu_pytorch_tanh", lambda v: v in ("gelu_pytorch_tanh", None))
        _refuse(raw, "use_clipped_linears", False, lambda v: not v)
        _refuse(raw, "standardize", False, lambda v: not v)
        rope = raw.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ConfigError(f"vision_config.rope_parameters.rope_type: {rope.get('rope_type')!r}, expected 'axial'")
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw and raw[k] is not None}
        if "rope_theta" in rope:
            known["rope_theta"] = float(rope["rope_theta"])
        cfg = cls(**known)
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "pooling_kernel_size", "patch_size",
                     "position_embedding_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"vision_config.{name}: expected a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"vision_config: {self.num_attention_heads} heads are not a multiple of "
                              f"{self.num_key_value_heads} KV heads")
        if self.head_dim % 4:
            raise ConfigError(f"vision_config.head_dim: {self.head_dim} is not divisible by 4 (axial RoPE over x and y)")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rope_parameters"] = {"rope_type": "axial", "rope_theta": out.pop("rope_theta")}
        return out

    @property
    def patch_pixels(self) -> int:
        return 3 * self.patch_size ** 2


def _refuse(raw: dict, key: str, default, supported) -> None:
    value = raw.get(key, default)
    if not supported(value):
        raise ConfigError(f"vision_config.{key}: {value!r} is not supported by g4c's vision tower")


def vision_tower_shapes(cfg: VisionTowerConfig, text_hidden: int) -> dict[str, tuple[int, ...]]:
    """Every tensor the vision tower and its projection read (checkpoint key minus `model.`)."""
    H, I, nh, nkv, hd = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                         cfg.num_key_value_heads, cfg.head_dim)
    shapes = {f"{PREFIX}patch_embedder.input_proj.weight": (H, cfg.patch_pixels),
              f"{PREFIX}patch_embedder.position_embedding_table": (2, cfg.position_embedding_size, H),
              f"{EMBED}embedding_projection.weight": (text_hidden, H)}
    for i in range(cfg.num_hidden_layers):
        p = f"{PREFIX}encoder.layers.{i}."
        shapes.update({f"{p}self_attn.q_proj.linear.weight": (nh * hd, H),
                       f"{p}self_attn.k_proj.linear.weight": (nkv * hd, H),
                       f"{p}self_attn.v_proj.linear.weight": (nkv * hd, H),
                       f"{p}self_attn.o_proj.linear.weight": (H, nh * hd),
                       f"{p}self_attn.q_norm.weight": (hd,), f"{p}self_attn.k_norm.weight": (hd,),
                       f"{p}mlp.gate_proj.linear.weight": (I, H), f"{p}mlp.up_proj.linear.weight": (I, H),
                       f"{p}mlp.down_proj.linear.weight": (H, I)})
        shapes.update({f"{p}{n}.weight": (H,) for n in ("input_layernorm", "post_attention_layernorm",
                                                       "pre_feedforward_layernorm", "post_feedforward_layernorm")})
    return shapes


class _Builder:
    def __init__(self, cfg: VisionTowerConfig, text_hidden: int):
        self.cfg, self.g = cfg, Graph("gemma4_encode_image", meta={"mode": "encode_image"})
        self.shapes = vision_tower_shapes(cfg, text_hidden)

    def w(self, name: str) -> Node:
        return self.g.param(name, self.shapes[name], "float32")

    def linear(self, x: Node, weight: str, name: str) -> Node:
        return self.g.call("linear", x, self.w(weight), name=name)

    def norm(self, x: Node, weight: str | None, name: str) -> Node:
        inputs = (x, self.w(weight)) if weight else (x,)
        return self.g.call("rms_norm", *inputs, eps=self.cfg.rms_norm_eps, name=name)


def build_vision_graph(cfg: VisionTowerConfig, text_hidden: int) -> Graph:
    """One image's T patches → its S soft tokens in the text width (see the module docstring)."""
    b = _Builder(cfg, text_hidden)
    g = b.g
    k2 = cfg.pooling_kernel_size ** 2
    patches = g.input("patches", ("T", cfg.patch_pixels), "float32")
    xy = g.input("patch_positions", ("T", 2), "int64")
    px, py = g.input("patch_x", ("T",), "int64"), g.input("patch_y", ("T",), "int64")
    positions, reach = g.input("positions", ("T",), "int64"), g.input("reach", ("T",), "int64")
    pool = g.input("pool", ("S", k2), "int64")

    x = b.linear(patches, f"{PREFIX}patch_embedder.input_proj.weight", name="patch_proj")
    table = b.w(f"{PREFIX}patch_embedder.position_embedding_table")
    pos_emb = [g.call("embedding", g.call("select", table, axis=0, index=axis, name=f"pos_table_{axis}"), ids,
                      name=f"pos_emb_{axis}") for axis, ids in enumerate((px, py))]
    x = g.call("add", x, g.call("add", *pos_emb, name="pos_emb"), name="patch_embed")
    for i in range(cfg.num_hidden_layers):
        x = _encoder_layer(b, i, x, xy, positions, reach)

    soft = g.call("pool_rows", x, pool, name="pooled")
    soft = g.call("scale", soft, value=math.sqrt(cfg.hidden_size), name="pooled_scaled")
    soft = b.norm(soft, None, name="embed_norm")
    g.output("embeddings", b.linear(soft, f"{EMBED}embedding_projection.weight", name="embed_proj"))
    return g


def _encoder_layer(b: _Builder, i: int, x: Node, xy: Node, positions: Node, reach: Node) -> Node:
    g, cfg, p = b.g, b.cfg, f"{PREFIX}encoder.layers.{i}."
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    h = b.norm(x, f"{p}input_layernorm.weight", name=f"v{i}_attn_in")

    def heads(proj: str, count: int, norm: str | None, rotate: bool, tag: str) -> Node:
        y = b.linear(h, f"{p}self_attn.{proj}.linear.weight", name=f"v{i}_{tag}")
        y = g.call("reshape", y, shape=("T", count, hd), name=f"v{i}_{tag}_heads")
        y = b.norm(y, norm and f"{p}self_attn.{norm}.weight", name=f"v{i}_{tag}_norm")
        return g.call("rope_axial", y, xy, theta=cfg.rope_theta, name=f"v{i}_{tag}_rope") if rotate else y

    q = heads("q_proj", nh, "q_norm", True, "q")
    k = heads("k_proj", nkv, "k_norm", True, "k")
    v = heads("v_proj", nkv, None, False, "v")
    a = g.call("attention", q, k, v, positions, reach, scaling=1.0, window=None, name=f"v{i}_attn")
    a = g.call("reshape", a, shape=("T", nh * hd), name=f"v{i}_attn_flat")
    o = b.linear(a, f"{p}self_attn.o_proj.linear.weight", name=f"v{i}_o")
    x = g.call("add", x, b.norm(o, f"{p}post_attention_layernorm.weight", name=f"v{i}_attn_post"),
               name=f"v{i}_attn_res")

    m = b.norm(x, f"{p}pre_feedforward_layernorm.weight", name=f"v{i}_mlp_in")
    gate = g.call("gelu_tanh", b.linear(m, f"{p}mlp.gate_proj.linear.weight", name=f"v{i}_mlp_gate"),
                  name=f"v{i}_mlp_act")
    up = b.linear(m, f"{p}mlp.up_proj.linear.weight", name=f"v{i}_mlp_up")
    m = b.linear(g.call("mul", gate, up, name=f"v{i}_mlp_glu"), f"{p}mlp.down_proj.linear.weight",
                 name=f"v{i}_mlp_down")
    return g.call("add", x, b.norm(m, f"{p}post_feedforward_layernorm.weight", name=f"v{i}_mlp_post"),
                  name=f"v{i}_mlp_res")
