"""cse — common-subexpression elimination.

Matches nodes with the same op, the same inputs (by identity, after earlier merges) and equal
attributes, e.g. two `rms_norm(x)` without scale or two `concat`s of the same weights. Produces one
node used by all. Exact: ops are pure functions of their inputs and attributes; stateful ops
(`kv_cache`, `fused_attention`) and graph inputs are never merged.
"""

from __future__ import annotations

import json

from g4c.ir import Graph, Node
from g4c.passes.manager import Pass, PassContext
from g4c.passes.rewrite import is_stateful


def _key(node: Node) -> str:
    # inputs by name: earlier merges already redirected uses to the surviving node
    return json.dumps([node.op, [i.name for i in node.inputs], node.attrs], sort_keys=True, default=str)


def run(graph: Graph, ctx: PassContext) -> None:
    seen: dict[str, Node] = {}
    for node in list(graph.nodes):
        if is_stateful(node) or node.op == "input":
            continue
        key = _key(node)
        if key in seen:
            graph.replace_all_uses(node, seen[key])
            graph.erase(node)
        else:
            seen[key] = node


PASS = Pass("cse", run, __doc__)
