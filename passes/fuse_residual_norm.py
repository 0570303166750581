"""fuse_residual_norm — sandwich norm + residual add as one epilogue.

Matches `add(r, rms_norm(y, w))` (post-attention / post-feedforward / PLE-output norms followed by
the residual add). Produces `add_rms_norm(r, y, w)`. Exact: the fused reference kernel computes the
same norm and the same single addition; the norm node is removed only when the add was its sole user.
"""

from __future__ import annotations

from g4c.ir import Graph
from g4c.passes.manager import Pass, PassContext
from g4c.passes.rewrite import remove_unused


def run(graph: Graph, ctx: PassContext) -> None:
    for add in [n for n in graph.nodes if n.op == "add"]:
        residual, normed = add.inputs
        if normed.op != "rms_norm" or len(normed.inputs) != 2 or add.type != residual.type:
            continue
        y, w = normed.inputs
        if y.type != residual.type:
            continue
        fused = graph.call("add_rms_norm", residual, y, w, eps=normed.attrs["eps"], name=f"{add.name}_norm",
                           before=add)
        graph.replace_all_uses(add, fused)
        remove_unused(graph, [add, normed])


PASS = Pass("fuse_residual_norm", run, __doc__)
