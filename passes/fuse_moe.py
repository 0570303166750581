"""fuse_moe — router, expert dispatch and expert FFNs as one `moe` op.

Matches, per `moe_experts` node, the router
    z = scale(mul(rms_norm(r), router.scale), H^-0.5); p = softmax(linear(z, Wr)); idx = topk(p, k)
    w = mul(div(take_along(p, idx), reduce_sum(take_along(p, idx))), embedding(per_expert_scale, idx))
the expert input `rms_norm(r, pre_norm_2)` and the output norm `rms_norm(moe_experts(...), post_norm_2)`,
and produces `moe(r, router.scale, Wr, per_expert_scale, pre_norm_2, gate_up, down, post_norm_2)`.
Decode graphs (one token) get `decode=True`: the kernel gathers only the k selected experts' weights
instead of visiting experts.

Exact: the fused reference kernel applies the same router arithmetic (fp32 softmax, stable top-k,
renormalisation, per-expert scale) and the same per-expert gate_up → gelu·up → down, weighted and
summed; the decode form sums the same k products for its single token.
"""

from __future__ import annotations

from g4c.ir import Graph, Node
from g4c.passes.manager import Pass, PassContext
from g4c.passes.rewrite import NoMatch, expect, remove_unused


def run(graph: Graph, ctx: PassContext) -> None:
    for experts in [n for n in graph.nodes if n.op == "moe_experts"]:
        try:
            _fuse(graph, experts)
        except NoMatch:
            continue


def _fuse(graph: Graph, experts: Node) -> None:
    e_in, idx, weights, gate_up, down = experts.inputs
    r, pre_norm = expect(e_in, "rms_norm", 2)
    w_norm, expert_scale = expect(weights, "mul")
    per_expert_scale, idx2 = expect(expert_scale, "embedding")
    w_top, w_sum = expect(w_norm, "div")
    probs, idx3 = expect(w_top, "take_along")
    (w_top2,) = expect(w_sum, "reduce_sum")
    (probs2,) = expect(idx, "topk")
    (logits,) = expect(probs, "softmax")
    z, w_router = expect(logits, "linear")
    (z_scaled,) = expect(z, "scale")
    z_norm, router_scale = expect(z_scaled, "mul")
    (r2,) = expect(z_norm, "rms_norm", 1)
    if not (idx2 is idx and idx3 is idx and w_top2 is w_top and probs2 is probs and r2 is r):
        raise NoMatch("router graph is not the expected one")
    users = graph.users(experts)
    if len(users) != 1 or users[0].op != "rms_norm" or len(users[0].inputs) != 2:
        raise NoMatch("expert output is not followed by its post norm")
    post = users[0]
    decode = r.type.shape[0] == 1
    fused = graph.call("moe", r, router_scale, w_router, per_expert_scale, pre_norm, gate_up, down,
                       post.inputs[1], eps=post.attrs["eps"], top_k=idx.attrs["k"],
                       router_input_scale=z.attrs["value"], decode=decode,
                       name=experts.name, before=post)
    graph.replace_all_uses(post, fused)
    remove_unused(graph, [post, experts, e_in, weights, expert_scale, w_norm, w_top, w_sum, idx, probs, logits,
                          z, z_scaled, z_norm])


PASS = Pass("fuse_moe", run, __doc__)
