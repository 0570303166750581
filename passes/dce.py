"""dce — dead-code elimination.

Matches nodes from which no graph output is reachable. Produces the graph without them. Exact:
removed nodes contribute to no output; nodes that write the KV state (`kv_cache`,
`fused_attention`) are kept even when their value is unused, so the state a later step reads is
unchanged.
"""

from __future__ import annotations

from g4c.ir import Graph
from g4c.passes.manager import Pass, PassContext
from g4c.passes.rewrite import is_stateful


def run(graph: Graph, ctx: PassContext) -> None:
    live = {id(n) for n in graph.outputs.values()} | {id(n) for n in graph.nodes if is_stateful(n)}
    for node in reversed(graph.nodes):
        if id(node) in live:
            live.update(id(i) for i in node.inputs)
    graph.nodes[:] = [n for n in graph.nodes if id(n) in live or n.op == "input"]
    graph._names = {n.name for n in graph.nodes}


PASS = Pass("dce", run, __doc__)
