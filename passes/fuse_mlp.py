"""fuse_mlp — the gated MLP as one op with a norm prologue and one gate+up GEMM.

Matches `linear(mul(gelu_tanh(linear(h, Wg)), linear(h, Wu)), Wd)` with `h = rms_norm(x, w)`.
Produces `gated_mlp(x, w, concat(Wg, Wu), Wd)`: the RMSNorm becomes the GEMM's prologue, gate and up
are one GEMM over the row-concatenated weights, gelu·mul is its epilogue, then the down projection.

Exact: the concatenated GEMM computes the same dot products as the two separate ones, and the fused
reference kernel applies norm, gelu, product and down projection in the matched order. The norm is
absorbed only when the MLP is its sole user (otherwise it stays and the fused op recomputes it from x,
which gives identical values).
"""

from __future__ import annotations

from g4c.ir import Graph, Node
from g4c.passes.manager import Pass, PassContext
from g4c.passes.rewrite import NoMatch, expect, remove_unused


def run(graph: Graph, ctx: PassContext) -> None:
    for mul in [n for n in graph.nodes if n.op == "mul"]:
        try:
            _fuse(graph, mul)
        except NoMatch:
            continue


def _fuse(graph: Graph, mul: Node) -> None:
    act, up = mul.inputs
    (gate,) = expect(act, "gelu_tanh")
    h, w_gate = expect(gate, "linear")
    h_up, w_up = expect(up, "linear")
    if h_up is not h:
        raise NoMatch("gate and up read different inputs")
    x, norm = expect(h, "rms_norm", 2)
    users = graph.users(mul)
    if len(users) != 1 or users[0].op != "linear" or users[0].inputs[0] is not mul:
        raise NoMatch("gelu·up is not consumed by one down projection")
    down = users[0]
    prefix = down.name.removesuffix("_down")
    w_gate_up = graph.call("concat", w_gate, w_up, axis=0, name=f"{prefix}_w_gate_up", before=down)
    fused = graph.call("gated_mlp", x, norm, w_gate_up, down.inputs[1], eps=h.attrs["eps"], name=prefix,
                       before=down)
    graph.replace_all_uses(down, fused)
    remove_unused(graph, [down, mul, act, gate, up, h])


PASS = Pass("fuse_mlp", run, __doc__)
