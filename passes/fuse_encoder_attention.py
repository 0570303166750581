"""fuse_encoder_attention — one `encoder_attention` op per vision-encoder layer.

Matches, per `attention` node whose K and V are not cached (an encoder: every token is in the call),
the vision tower's attention block (`g4c.vision`):
    h = rms_norm(x, in_norm)
    q = rope_axial(rms_norm(reshape(linear(h, Wq)), q_norm), xy)
    k = rope_axial(rms_norm(reshape(linear(h, Wk)), k_norm), xy)
    v = rms_norm(reshape(linear(h, Wv)))
    out = linear(reshape(attention(q, k, v, positions, reach)), Wo)
Produces `encoder_attention(x, xy, positions, reach, in_norm, concat(Wq, Wk, Wv), q_norm, k_norm, Wo)`
with attributes head_dim, q/kv heads, eps and the RoPE theta.

Exact: q, k, v come from one GEMM over the row-concatenated weights (the same dot products as three
GEMMs); the fused reference kernel applies the matched sequence in order. The input RMSNorm is
absorbed only when the attention block is its sole user.
"""

from __future__ import annotations

from g4c.ir import Graph, Node
from g4c.passes.manager import Pass, PassContext
from g4c.passes.rewrite import NoMatch, expect, remove_unused


def run(graph: Graph, ctx: PassContext) -> None:
    for attn in [n for n in graph.nodes if n.op == "attention" and len(n.inputs) == 5]:
        try:
            _fuse(graph, attn)
        except NoMatch:
            continue


def _fuse(graph: Graph, attn: Node) -> None:
    q_rope, k_rope, v_normed, positions, reach = attn.inputs
    users = graph.users(attn)
    if len(users) != 1 or users[0].op != "reshape":
        raise NoMatch("attention output is not flattened once")
    flat = users[0]
    o_users = graph.users(flat)
    if len(o_users) != 1 or o_users[0].op != "linear":
        raise NoMatch("the flattened attention is not projected once")
    o_proj = o_users[0]
    q_lin, w_q, q_norm, xy, q_nodes = _rotated(q_rope)
    k_lin, w_k, k_norm, k_xy, k_nodes = _rotated(k_rope)
    (v_heads,) = expect(v_normed, "rms_norm", 1)
    (v_lin,) = expect(v_heads, "reshape")
    h, w_v = expect(v_lin, "linear")
    if q_lin.inputs[0] is not h or k_lin.inputs[0] is not h or k_xy is not xy:
        raise NoMatch("q, k and v do not project the same normed input at the same positions")
    x, in_norm = expect(h, "rms_norm", 2)
    q_heads = q_nodes[-1]
    name = attn.name.removesuffix("_attn")
    w_qkv = graph.call("concat", w_q, w_k, w_v, axis=0, name=f"{name}_w_qkv", before=o_proj)
    fused = graph.call("encoder_attention", x, xy, positions, reach, in_norm, w_qkv, q_norm, k_norm, o_proj.inputs[1],
                       q_heads=q_heads.type.shape[1], kv_heads=v_heads.type.shape[1], head_dim=q_heads.type.shape[2],
                       eps=h.attrs["eps"], theta=q_rope.attrs["theta"], name=f"{name}_attention", before=o_proj)
    graph.replace_all_uses(o_proj, fused)
    remove_unused(graph, [o_proj, flat, attn, *q_nodes, *k_nodes, v_normed, v_heads, v_lin, h])


def _rotated(rope: Node) -> tuple[Node, Node, Node, Node, list[Node]]:
    """rope_axial(rms_norm(reshape(linear(h, W)), norm), xy) → (linear, W, norm, xy, matched nodes)."""
    normed, xy = expect(rope, "rope_axial")
    heads, norm = expect(normed, "rms_norm", 2)
    (lin,) = expect(heads, "reshape")
    _, w = expect(lin, "linear")
    return lin, w, norm, xy, [rope, normed, lin, heads]


PASS = Pass("fuse_encoder_attention", run, __doc__)
