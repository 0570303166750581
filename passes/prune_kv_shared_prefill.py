"""prune_kv_shared_prefill — KV-sharing layers compute only the positions whose logits are kept.

Matches a prefill graph (token dim `T`) that keeps only the last `n` logits (`take_last(count=n)`)
and has fused KV-sharing layers (`fused_attention` with role `reuse`). Those layers write no cache,
so nothing later reads their other positions. Produces the same graph where every value entering
the tail (from the first KV-sharing layer on) with a leading token dim — the residual stream,
`positions`, the PLE inputs — goes through `take_last(n)` first, and the tail computes n rows.

Exact: every op in the tail is row-wise in the token dim except attention, whose queries are the
kept rows and whose keys/values come, whole, from the donor layers' caches; the caches written
before the tail are unchanged. transformers does the same slicing (`_maybe_slice_kv_shared_inputs`).
Runs after fuse_attention (on unfused graphs it changes nothing).
"""

from __future__ import annotations

from g4c.ir import Graph, Node
from g4c.passes.manager import Pass, PassContext
from g4c.passes.rewrite import remove_unused

TOKENS = "T"


def run(graph: Graph, ctx: PassContext) -> None:
    keeps = [n for n in graph.nodes if n.op == "take_last"]
    reuse = [n for n in graph.nodes if n.op == "fused_attention" and n.attrs["role"] == "reuse"]
    if len(keeps) != 1 or not reuse:
        return
    count = keeps[0].attrs["count"]
    first = reuse[0]
    boundary = first.inputs[0]
    if boundary.type.shape[0] != TOKENS:
        return  # decode graph, or already pruned
    tail = _tail(graph, boundary)
    sliced: dict[int, Node] = {}
    anchor = first
    for node in [n for n in graph.nodes if id(n) in tail]:
        node.inputs = tuple(_slice(graph, i, count, sliced, anchor) if _needs_slice(node, j, i, tail) else i
                            for j, i in enumerate(node.inputs))
        if node.op == "reshape":
            node.attrs["shape"] = tuple(count if d == TOKENS else d for d in node.attrs["shape"])
        graph.retype(node)
    keep = keeps[0]
    if keep.inputs[0].type.shape[0] == count:  # the final slice is now the identity
        graph.replace_all_uses(keep, keep.inputs[0])
        remove_unused(graph, [keep])


def _tail(graph: Graph, boundary: Node) -> set[int]:
    """Nodes after `boundary` that depend on it (ignoring the donor ordering edges)."""
    tail: set[int] = set()
    start = graph.nodes.index(boundary) + 1
    for node in graph.nodes[start:]:
        if any((i is boundary or id(i) in tail) and not _is_donor_edge(node, j) for j, i in enumerate(node.inputs)):
            tail.add(id(node))
    return tail


def _is_donor_edge(node: Node, index: int) -> bool:
    return node.op == "fused_attention" and node.attrs["role"] == "reuse" and index == 6


def _needs_slice(node: Node, index: int, value: Node, tail: set[int]) -> bool:
    return (id(value) not in tail and not _is_donor_edge(node, index) and value.type.rank > 0
            and value.type.shape[0] == TOKENS)


def _slice(graph: Graph, value: Node, count: int, cache: dict[int, Node], anchor: Node) -> Node:
    if id(value) not in cache:
        cache[id(value)] = graph.call("take_last", value, count=count, name=f"{value.name}_last", before=anchor)
    return cache[id(value)]


PASS = Pass("prune_kv_shared_prefill", run, __doc__)
