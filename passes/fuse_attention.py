"""fuse_attention — one `fused_attention` op per layer.

Matches, per `attention` node, the frontend's attention block:
    h = rms_norm(x, in_norm)
    q = rope(rms_norm(reshape(linear(h, Wq)), q_norm), pos)
    own layers:   k = kv_cache(rope(rms_norm(reshape(linear(h, Wk)), k_norm), pos))
                  v = kv_cache(rms_norm(reshape(linear(h, Wv))))   (k_eq_v: the reshaped k projection)
    reuse layers: k, v = the donor layer's kv_cache nodes
    out = linear(reshape(attention(q, k, v, pos)), Wo)
Produces `fused_attention(x, pos, in_norm, concat(Wq, Wk[, Wv]), q_norm, k_norm, Wo)` for own layers
and `fused_attention(x, pos, in_norm, Wq, q_norm, Wo, donor)` for KV-sharing layers, with attributes
kind, window, head_dim, q/kv heads, RoPE parameters, KV source layer and cache slots; an attention
with a `reach` input (a media prompt's sliding layer) passes it as the fused op's last input (`reach`).

Exact: q, k, v come from one GEMM over the row-concatenated weights, which computes the same dot
products as three GEMMs; the fused op's reference kernel then applies exactly the matched sequence
(norm prologue, q/k/v norms, RoPE, cache append, masked GQA, o_proj). The input RMSNorm is only
absorbed when the attention block is its sole user.
"""

from __future__ import annotations

from g4c.ir import Graph, Node
from g4c.passes.manager import Pass, PassContext
from g4c.passes.rewrite import NoMatch, expect, remove_unused


def run(graph: Graph, ctx: PassContext) -> None:
    donors: dict[str, Node] = {}  # v cache slot → fused node of the layer that writes it
    absorbed: list[Node] = []
    for attn in [n for n in graph.nodes if n.op == "attention"]:
        try:
            absorbed += _fuse(graph, attn, donors)
        except NoMatch:
            continue
    # a donor's cache nodes die only once its consumers are fused too, hence removal at the end
    remove_unused(graph, absorbed)


def _fuse(graph: Graph, attn: Node, donors: dict[str, Node]) -> list[Node]:
    users = graph.users(attn)
    if len(users) != 1:
        raise NoMatch("attention output used more than once")
    (flat,) = users
    expect(flat, "reshape")
    (o_proj,) = _single_user(graph, flat, "linear")
    q_rope, k_node, v_node, positions, *reach = attn.inputs
    q_norm_node, _ = expect(q_rope, "rope")
    q_heads, q_norm = expect(q_norm_node, "rms_norm", 2)
    (q_lin,) = expect(q_heads, "reshape")
    h, w_q = expect(q_lin, "linear")
    x, in_norm = expect(h, "rms_norm", 2)
    head_dim = q_heads.type.shape[2]
    rope = {k: q_rope.attrs[k] for k in ("rope_type", "theta", "partial_rotary_factor")}
    layer = _layer_of(w_q)
    common = dict(layer=layer, kind="sliding" if attn.attrs["window"] is not None else "global",
                  window=attn.attrs["window"], head_dim=head_dim, q_heads=q_heads.type.shape[1],
                  kv_heads=k_node.type.shape[1], eps=h.attrs["eps"], **rope)
    if reach:  # a media prompt's sliding layer: the reach input is the fused op's last
        common["reach"] = True
    absorbed = [o_proj, flat, attn, q_rope, q_norm_node, q_heads, q_lin]

    k_slot, v_slot = _slot(k_node), _slot(v_node)
    if v_slot in donors:  # KV sharing: read the donor's cache
        donor = donors[v_slot]
        attrs = dict(common, role="reuse", kv_source=donor.attrs["layer"], k_eq_v=donor.attrs["k_eq_v"],
                     k_slot=k_slot, v_slot=v_slot)
        inputs = (x, positions, in_norm, w_q, q_norm, o_proj.inputs[1], donor)
    else:
        k_parts = _own_kv(k_node, v_node, h, positions)
        w_k, k_norm, w_v, k_eq_v, kv_nodes = k_parts
        weights = (w_q, w_k) if k_eq_v else (w_q, w_k, w_v)
        w_qkv = graph.call("concat", *weights, axis=0, name=f"l{layer}_w_qkv", before=o_proj)
        attrs = dict(common, role="own", kv_source=layer, k_eq_v=k_eq_v, k_slot=k_slot, v_slot=v_slot)
        inputs = (x, positions, in_norm, w_qkv, q_norm, k_norm, o_proj.inputs[1])
        absorbed += kv_nodes
    fused = graph.call("fused_attention", *inputs, *reach, name=f"l{layer}_attention", before=o_proj, **attrs)
    if attrs["role"] == "own":
        donors[v_slot] = fused
    graph.replace_all_uses(o_proj, fused)
    return absorbed + [h]


def _single_user(graph: Graph, node: Node, op: str) -> list[Node]:
    users = graph.users(node)
    if len(users) != 1 or users[0].op != op:
        raise NoMatch(f"%{node.name} is not used by exactly one {op}")
    return users


def _slot(cache: Node) -> str:
    expect(cache, "kv_cache")
    return cache.attrs["slot"]


def _layer_of(weight: Node) -> int:
    name = weight.attrs.get("name", "")
    parts = name.split(".")
    if len(parts) < 2 or parts[0] != "layers" or not parts[1].isdigit():
        raise NoMatch(f"weight {name!r} is not a layer weight")
    return int(parts[1])


def _own_kv(k_cache: Node, v_cache: Node, h: Node, positions: Node):
    """Match this layer's own K/V projection chain; returns (Wk, k_norm, Wv, k_eq_v, absorbed nodes)."""
    (k_rope,) = expect(k_cache, "kv_cache")
    k_normed, k_pos = expect(k_rope, "rope")
    k_heads, k_norm = expect(k_normed, "rms_norm", 2)
    (k_lin,) = expect(k_heads, "reshape")
    k_h, w_k = expect(k_lin, "linear")
    (v_normed,) = expect(v_cache, "kv_cache")
    (v_heads,) = expect(v_normed, "rms_norm", 1)
    if k_h is not h or k_pos is not positions:
        raise NoMatch("k projection does not read the attention input")
    absorbed = [k_cache, k_rope, k_normed, k_heads, k_lin, v_cache, v_normed]
    if v_heads is k_heads:  # k_eq_v: v is the raw k projection
        return w_k, k_norm, None, True, absorbed
    (v_lin,) = expect(v_heads, "reshape")
    v_h, w_v = expect(v_lin, "linear")
    if v_h is not h:
        raise NoMatch("v projection does not read the attention input")
    return w_k, k_norm, w_v, False, absorbed + [v_heads, v_lin]


PASS = Pass("fuse_attention", run, __doc__)
