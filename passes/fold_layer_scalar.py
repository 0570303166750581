"""fold_layer_scalar — drop `x * layer_scalar` where the checkpoint's layer_scalar is exactly 1.

Matches `mul(x, param layers.N.layer_scalar)` and, when the weight values are available to the pass
manager and equal 1.0 exactly, produces `x` in its place. Exact: multiplying by 1.0 is the identity
in IEEE arithmetic. Without weight values (compiling for unknown weights) the pass changes nothing.
"""

from __future__ import annotations

import numpy as np

from g4c.ir import Graph
from g4c.passes.manager import Pass, PassContext
from g4c.passes.rewrite import remove_unused


def run(graph: Graph, ctx: PassContext) -> None:
    if ctx.weights is None:
        return
    for mul in [n for n in graph.nodes if n.op == "mul"]:
        x, scalar = mul.inputs
        if scalar.op != "param" or not scalar.attrs["name"].endswith(".layer_scalar") or x.type != mul.type:
            continue
        if np.all(np.asarray(ctx.weights(scalar.attrs["name"]), dtype=np.float32) == 1.0):
            graph.replace_all_uses(mul, x)
            remove_unused(graph, [mul, scalar])


PASS = Pass("fold_layer_scalar", run, __doc__)
