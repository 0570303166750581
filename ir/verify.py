"""The IR verifier: structural invariants every graph (and every pass result) must keep."""

from __future__ import annotations

from g4c.ir.graph import Graph
from g4c.ir.ops import IRTypeError, OPS, check_signature


class VerificationError(ValueError):
    """The graph breaks an IR invariant; the message names the node."""


def verify(graph: Graph) -> None:
    """Check: known ops with the right arity/attrs; unique names; every input defined earlier (the
    node order is topological); stored types equal the op's shape rule; unique params and KV slots;
    outputs are nodes of the graph."""
    seen: set[int] = set()
    names: set[str] = set()
    params: set[str] = set()
    slots: set[str] = set()
    for node in graph.nodes:
        where = f"node %{node.name} ({node.op})"
        if node.name in names:
            raise VerificationError(f"{where}: duplicate name")
        names.add(node.name)
        try:
            spec = check_signature(node.op, node.inputs, node.attrs)
        except IRTypeError as exc:
            raise VerificationError(f"{where}: {exc}") from None
        for i in node.inputs:
            if id(i) not in seen:
                raise VerificationError(f"{where}: input %{i.name} is not defined before its use")
        if spec.infer is not None:
            try:
                expected = spec.infer(node.inputs, node.attrs)
            except IRTypeError as exc:
                raise VerificationError(f"{where}: {exc}") from None
            if expected != node.type:
                raise VerificationError(f"{where}: stored type {node.type} but the op gives {expected}")
        _check_unique(node, "param", "name", params, where)
        _check_unique(node, "kv_cache", "slot", slots, where)
        seen.add(id(node))
    for key, out in graph.outputs.items():
        if id(out) not in seen:
            raise VerificationError(f"output {key!r}: %{out.name} is not a node of the graph")
    if not graph.outputs:
        raise VerificationError("graph has no outputs")


def _check_unique(node, op: str, attr: str, seen: set[str], where: str) -> None:
    if node.op != op:
        return
    value = node.attrs[attr]
    if value in seen:
        raise VerificationError(f"{where}: {attr} {value!r} appears twice")
    seen.add(value)


__all__ = ["verify", "VerificationError", "OPS"]
