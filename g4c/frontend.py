"""The Gemma 4 text decoder as a g4c graph: one readable place that says what the model computes.

`build_graph(cfg)` emits the whole forward pass for T new tokens after P cached ones (`mode="prefill"`,
T symbolic) or one token (`mode="decode"`, T = 1), following transformers' `Gemma4ForCausalLM`:

    x = embed_tokens[ids] * sqrt(H)
    ple = ((RMSNorm_P(x @ W_plmp * H^-0.5) + embed_tokens_per_layer[ids] * sqrt(P)) * 2^-0.5)   # if PLE
    per layer: attention block (q/k/v norms, RoPE, KV cache or KV reuse, GQA, sliding window),
               MLP (+ MoE block), PLE epilogue, layer_scalar
    logits = softcap(RMSNorm(x) @ embed_tokens^T)

KV sharing is explicit dataflow: a "reuse" layer's attention reads the K/V nodes of its donor layer,
so use-def queries show producers and consumers. The graph is unfused on purpose; `passes/` fuses it.
"""

from __future__ import annotations

import math

from g4c.config import LayerSpec, ModelConfig
from g4c.dtypes import round_to_dtype
from g4c.ir.graph import Graph, Node
from g4c.weights import expected_shapes

MODES = ("prefill", "decode")


class _Builder:
    """Small helpers so the model code below reads like the math."""

    def __init__(self, graph: Graph, cfg: ModelConfig, weight_dtype: str):
        self.g, self.cfg, self.weight_dtype = graph, cfg, weight_dtype
        self.shapes = expected_shapes(cfg)

    def w(self, name: str) -> Node:
        return self.g.param(name, self.shapes[name], self.weight_dtype)

    def norm(self, x: Node, weight: str | None, name: str) -> Node:
        inputs = (x, self.w(weight)) if weight else (x,)
        return self.g.call("rms_norm", *inputs, eps=self.cfg.rms_norm_eps, name=name)

    def linear(self, x: Node, weight: str, name: str) -> Node:
        return self.g.call("linear", x, self.w(weight), name=name)


def build_graph(cfg: ModelConfig, mode: str = "prefill", logits_to_keep: int | None = None,
                weight_dtype: str = "float32", compute_dtype: str = "float32", media: bool = False) -> Graph:
    """The full text model. `logits_to_keep=None` returns logits for every new token [T, vocab];
    an integer keeps only the last ones (generation needs 1). `compute_dtype` is the activation dtype
    the embedding scales are rounded to (transformers rounds sqrt(H) to the weight dtype).

    `media` (prefill only): a prompt holding soft tokens (`Gemma4Model.forward` with images or audio).
    Inputs `soft` [T, H] (the encoders' embeddings) and `soft_mask` [T] (1 at soft tokens, whose ids
    the runtime sets to the pad token, as transformers does for the PLE table lookup) replace those
    rows of the embedded prompt, which the PLE projection then reads; with `use_bidirectional_attention="vision"`, input
    `reach` [T] (the last position each token sees: an image's soft tokens see their whole block)
    masks the sliding layers (transformers' `create_masks_for_vision_model`: global layers stay causal)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if media and mode != "prefill":
        raise ValueError("media inputs enter a prompt through prefill")
    tokens = "T" if mode == "prefill" else 1
    g = Graph(f"gemma4_{mode}{'_media' if media else ''}",
              meta={"mode": mode, "model_type": cfg.model_type, "num_layers": cfg.num_hidden_layers,
                    "weight_dtype": weight_dtype, "media": media})
    b = _Builder(g, cfg, weight_dtype)
    ids = g.input("ids", (tokens,), "int64")
    positions = g.input("positions", (tokens,), "int64")
    reach = None
    if media:
        soft = g.input("soft", (tokens, cfg.hidden_size), "float32")
        soft_mask = g.input("soft_mask", (tokens,), "int64")
        if cfg.use_bidirectional_attention == "vision":
            reach = g.input("reach", (tokens,), "int64")

    x = g.call("embedding", b.w("embed_tokens.weight"), ids, name="embed")
    x = g.call("scale", x, value=round_to_dtype(math.sqrt(cfg.hidden_size), compute_dtype), name="embed_scaled")
    if media:
        x = g.call("where_rows", soft_mask, soft, x, name="embed_media")
    ple = _per_layer_inputs(b, x, ids, tokens, compute_dtype) if cfg.has_ple else None

    kv: dict[int, tuple[Node, Node]] = {}
    for spec in cfg.layers:
        x = _decoder_layer(b, spec, x, positions, kv, ple, tokens, reach if spec.is_sliding else None)

    x = b.norm(x, "norm.weight", name="final_norm")
    if logits_to_keep is not None:
        x = g.call("take_last", x, count=logits_to_keep, name="keep_last")
    head = "embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    logits = b.linear(x, head, name="lm_head")
    if cfg.final_logit_softcapping is not None:
        logits = g.call("softcap", logits, cap=cfg.final_logit_softcapping, name="logits_softcap")
    g.output("logits", logits)
    return g


def _per_layer_inputs(b: _Builder, x: Node, ids: Node, tokens, compute_dtype: str) -> Node:
    """PLE: token-identity rows + a projection of the embedding, normalised and mixed → [T, L, P]."""
    g, cfg = b.g, b.cfg
    L, P = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
    tok = g.call("embedding", b.w("embed_tokens_per_layer.weight"), ids, name="ple_rows")
    tok = g.call("scale", tok, value=round_to_dtype(math.sqrt(P), compute_dtype), name="ple_rows_scaled")
    tok = g.call("reshape", tok, shape=(tokens, L, P), name="ple_rows_3d")
    prj = b.linear(x, "per_layer_model_projection.weight", name="ple_proj")
    prj = g.call("scale", prj, value=cfg.hidden_size ** -0.5, name="ple_proj_scaled")
    prj = g.call("reshape", prj, shape=(tokens, L, P), name="ple_proj_3d")
    prj = b.norm(prj, "per_layer_projection_norm.weight", name="ple_proj_norm")
    mixed = g.call("add", prj, tok, name="ple_sum")
    return g.call("scale", mixed, value=2.0 ** -0.5, name="ple")


def _decoder_layer(b: _Builder, spec: LayerSpec, x: Node, positions: Node, kv: dict[int, tuple[Node, Node]],
                   ple: Node | None, tokens, reach: Node | None = None) -> Node:
    g, cfg, i = b.g, b.cfg, spec.index
    p = f"layers.{i}."
    residual = x
    h = b.norm(x, p + "input_layernorm.weight", name=f"l{i}_attn_in")
    attn = _attention(b, spec, h, positions, kv, tokens, reach)
    attn = b.norm(attn, p + "post_attention_layernorm.weight", name=f"l{i}_attn_post")
    x = g.call("add", residual, attn, name=f"l{i}_attn_res")

    residual = x
    m = b.norm(x, p + "pre_feedforward_layernorm.weight", name=f"l{i}_mlp_in")
    m = _mlp(b, m, p + "mlp.", name=f"l{i}_mlp")
    if cfg.enable_moe_block:
        m1 = b.norm(m, p + "post_feedforward_layernorm_1.weight", name=f"l{i}_mlp_post1")
        m2 = _moe(b, residual, p, i)
        m = g.call("add", m1, m2, name=f"l{i}_ffn_sum")
    m = b.norm(m, p + "post_feedforward_layernorm.weight", name=f"l{i}_mlp_post")
    x = g.call("add", residual, m, name=f"l{i}_mlp_res")

    if ple is not None:
        x = _ple_epilogue(b, x, ple, p, i)
    return g.call("mul", x, b.w(p + "layer_scalar"), name=f"l{i}_out")


def _attention(b: _Builder, spec: LayerSpec, h: Node, positions: Node, kv: dict[int, tuple[Node, Node]],
               tokens, reach: Node | None = None) -> Node:
    g, cfg, i = b.g, b.cfg, spec.index
    p = f"layers.{i}.self_attn."
    nh, hd, nkv = cfg.num_attention_heads, spec.head_dim, spec.num_kv_heads
    rope = {"rope_type": spec.rope.rope_type, "theta": spec.rope.theta,
            "partial_rotary_factor": spec.rope.partial_rotary_factor}

    q = b.linear(h, p + "q_proj.weight", name=f"l{i}_q")
    q = g.call("reshape", q, shape=(tokens, nh, hd), name=f"l{i}_q_heads")
    q = b.norm(q, p + "q_norm.weight", name=f"l{i}_q_norm")
    q = g.call("rope", q, positions, name=f"l{i}_q_rope", **rope)

    if spec.kv_mode == "reuse":  # KV sharing: attend to the donor layer's cached K/V
        k, v = kv[spec.kv_source]
    else:
        k_raw = b.linear(h, p + "k_proj.weight", name=f"l{i}_k")
        k_raw = g.call("reshape", k_raw, shape=(tokens, nkv, hd), name=f"l{i}_k_heads")
        if spec.k_eq_v:  # v is the raw k projection (no v_proj on k_eq_v full layers)
            v_raw = k_raw
        else:
            v_raw = b.linear(h, p + "v_proj.weight", name=f"l{i}_v")
            v_raw = g.call("reshape", v_raw, shape=(tokens, nkv, hd), name=f"l{i}_v_heads")
        k = b.norm(k_raw, p + "k_norm.weight", name=f"l{i}_k_norm")
        k = g.call("rope", k, positions, name=f"l{i}_k_rope", **rope)
        k = g.call("kv_cache", k, slot=f"layers.{i}.k", name=f"l{i}_k_cache")
        v = b.norm(v_raw, None, name=f"l{i}_v_norm")  # v_norm has no scale
        v = g.call("kv_cache", v, slot=f"layers.{i}.v", name=f"l{i}_v_cache")
        kv[i] = (k, v)

    mask = (positions,) if reach is None else (positions, reach)
    a = g.call("attention", q, k, v, *mask, scaling=1.0, window=spec.window, name=f"l{i}_attn")
    a = g.call("reshape", a, shape=(tokens, nh * hd), name=f"l{i}_attn_flat")
    return b.linear(a, p + "o_proj.weight", name=f"l{i}_o")


def _mlp(b: _Builder, x: Node, p: str, name: str) -> Node:
    g = b.g
    gate = g.call("gelu_tanh", b.linear(x, p + "gate_proj.weight", name=f"{name}_gate"), name=f"{name}_act")
    up = b.linear(x, p + "up_proj.weight", name=f"{name}_up")
    return b.linear(g.call("mul", gate, up, name=f"{name}_glu"), p + "down_proj.weight", name=f"{name}_down")


def _moe(b: _Builder, residual: Node, p: str, i: int) -> Node:
    """Router (norm, scale, projection, softmax, top-k, renormalise, per-expert scale) + experts."""
    g, cfg = b.g, b.cfg
    z = b.norm(residual, None, name=f"l{i}_router_norm")
    z = g.call("mul", z, b.w(p + "router.scale"), name=f"l{i}_router_scaled")
    z = g.call("scale", z, value=cfg.hidden_size ** -0.5, name=f"l{i}_router_in")
    probs = g.call("softmax", b.linear(z, p + "router.proj.weight", name=f"l{i}_router_logits"),
                   name=f"l{i}_router_probs")
    idx = g.call("topk", probs, k=cfg.top_k_experts, name=f"l{i}_expert_idx")
    weights = g.call("take_along", probs, idx, name=f"l{i}_expert_p")
    weights = g.call("div", weights, g.call("reduce_sum", weights, name=f"l{i}_expert_psum"),
                     name=f"l{i}_expert_pnorm")
    expert_scale = g.call("embedding", b.w(p + "router.per_expert_scale"), idx, name=f"l{i}_expert_scale")
    weights = g.call("mul", weights, expert_scale, name=f"l{i}_expert_w")
    e = b.norm(residual, p + "pre_feedforward_layernorm_2.weight", name=f"l{i}_moe_in")
    e = g.call("moe_experts", e, idx, weights, b.w(p + "experts.gate_up_proj"), b.w(p + "experts.down_proj"),
               name=f"l{i}_moe")
    return b.norm(e, p + "post_feedforward_layernorm_2.weight", name=f"l{i}_moe_post")


def _ple_epilogue(b: _Builder, x: Node, ple: Node, p: str, i: int) -> Node:
    g = b.g
    gate = g.call("gelu_tanh", b.linear(x, p + "per_layer_input_gate.weight", name=f"l{i}_ple_gate"),
                  name=f"l{i}_ple_act")
    gate = g.call("mul", gate, g.call("select", ple, axis=1, index=i, name=f"l{i}_ple_in"), name=f"l{i}_ple_mix")
    out = b.linear(gate, p + "per_layer_projection.weight", name=f"l{i}_ple_proj")
    out = b.norm(out, p + "post_per_layer_input_norm.weight", name=f"l{i}_ple_norm")
    return g.call("add", x, out, name=f"l{i}_ple_res")
