"""Small helpers shared by the passes: structural matching and removal of absorbed nodes."""

from __future__ import annotations

from collections.abc import Iterable

from g4c.ir import Graph, Node
from g4c.ir.ops import STATEFUL_OPS


class NoMatch(Exception):
    """The subgraph does not have the expected shape; the pass leaves it alone."""


def expect(node: Node, op: str, arity: int | None = None) -> tuple[Node, ...]:
    """`node.inputs` if `node` is `op` (with `arity` inputs), else raise NoMatch."""
    if node.op != op or (arity is not None and len(node.inputs) != arity):
        raise NoMatch(f"%{node.name}: expected {op}, found {node.op}")
    return node.inputs


def remove_unused(graph: Graph, candidates: Iterable[Node]) -> None:
    """Erase the candidates (and, transitively, their inputs among them) once nothing uses them.

    Fusions call this on the nodes they absorbed: stateful ones (cache writes) must go, or the state
    would be written twice."""
    pending = {id(n): n for n in candidates}
    changed = True
    while changed:
        changed = False
        uses = graph.use_def()
        outputs = {id(n) for n in graph.outputs.values()}
        for key, node in list(pending.items()):
            if node in uses and not uses[node] and id(node) not in outputs:
                graph.erase(node)
                del pending[key]
                changed = True


def is_stateful(node: Node) -> bool:
    return node.op in STATEFUL_OPS
