"""The g4c graph IR: a `Graph` is an ordered list of `Node`s; each node applies one op from the closed
op set (`g4c.ir.ops`) to earlier nodes and has a `TensorType` with possibly symbolic dims
(`g4c.ir.types`, re-exported here).

Modelled on torch.fx: nodes keep their inputs (defs); uses are queried (`graph.users(node)`), node
order is a topological order (the verifier checks it), and the reference `Interpreter` is the
executable definition of every op.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from g4c.ir.ops import infer_type
from g4c.ir.types import Dim, Node, TensorType, dim_add, dim_value, shape_value

__all__ = ["Graph", "Dim", "Node", "TensorType", "dim_add", "dim_value", "shape_value"]


@dataclass
class Graph:
    """An ordered, topologically sorted list of nodes plus the graph's outputs."""

    name: str
    nodes: list[Node] = field(default_factory=list)
    outputs: dict[str, Node] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    _names: set[str] = field(default_factory=set, repr=False)

    # ---- construction --------------------------------------------------------------------------
    def _unique(self, hint: str) -> str:
        name, n = hint, 1
        while name in self._names:
            name, n = f"{hint}_{n}", n + 1
        self._names.add(name)
        return name

    def add(self, op: str, inputs: tuple[Node, ...], attrs: dict[str, Any], type_: TensorType,
            name: str | None = None, before: Node | None = None) -> Node:
        """Append a node (or insert it just before `before`, as rewrites need)."""
        node = Node(self._unique(name or op), op, tuple(inputs), dict(attrs), type_)
        if before is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(self.nodes.index(before), node)
        return node

    def input(self, name: str, shape: tuple[Dim, ...], dtype: str) -> Node:
        return self.add("input", (), {"name": name}, TensorType(tuple(shape), dtype), name=name)

    def param(self, weight: str, shape: tuple[int, ...], dtype: str) -> Node:
        """A weight, referenced by its canonical checkpoint name; one node per weight."""
        for node in self.nodes:
            if node.op == "param" and node.attrs["name"] == weight:
                return node
        return self.add("param", (), {"name": weight}, TensorType(tuple(shape), dtype),
                        name=weight.replace(".weight", "").replace(".", "_"))

    def call(self, op: str, *inputs: Node, name: str | None = None, before: Node | None = None,
             **attrs: Any) -> Node:
        """Append (or insert before `before`) `op(inputs, attrs)`; its type comes from the op's shape rule."""
        return self.add(op, inputs, attrs, infer_type(op, inputs, attrs), name=name, before=before)

    def output(self, name: str, node: Node) -> None:
        self.outputs[name] = node

    # ---- queries -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def inputs(self) -> list[Node]:
        return [n for n in self.nodes if n.op == "input"]

    @property
    def params(self) -> list[Node]:
        return [n for n in self.nodes if n.op == "param"]

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def users(self, node: Node) -> list[Node]:
        """Nodes that read `node` (its uses)."""
        return [n for n in self.nodes if any(i is node for i in n.inputs)]

    def use_def(self) -> dict[Node, list[Node]]:
        """Every node → the nodes that use it, in one pass."""
        uses: dict[Node, list[Node]] = {n: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                uses[i].append(n)
        return uses

    def to_networkx(self):
        """The dataflow graph as a `networkx.DiGraph` (node names as keys, op/type/attrs as data)."""
        import networkx as nx

        g = nx.DiGraph(name=self.name)
        for n in self.nodes:
            g.add_node(n.name, op=n.op, type=str(n.type), attrs=n.attrs)
            for i in n.inputs:
                g.add_edge(i.name, n.name)
        return g

    def topological_order(self) -> list[Node]:
        """A topological order computed by networkx (the stored order is one too, when verified)."""
        import networkx as nx

        by_name = {n.name: n for n in self.nodes}
        return [by_name[name] for name in nx.lexicographical_topological_sort(
            self.to_networkx(), key=lambda name: self.nodes.index(by_name[name]))]

    # ---- rewriting (for passes) ----------------------------------------------------------------
    def copy(self) -> "Graph":
        """A deep copy (new Node objects, same names/attrs), so a pass can rewrite without touching
        the original."""
        import copy as _copy

        mapping: dict[int, Node] = {}
        clone = Graph(self.name, meta=_copy.deepcopy(self.meta))
        for n in self.nodes:
            new = Node(n.name, n.op, tuple(mapping[id(i)] for i in n.inputs), _copy.deepcopy(n.attrs), n.type)
            mapping[id(n)] = new
            clone.nodes.append(new)
            clone._names.add(n.name)
        clone.outputs = {k: mapping[id(v)] for k, v in self.outputs.items()}
        return clone

    def retype(self, node: Node) -> None:
        """Recompute `node.type` from its op's shape rule (after its inputs changed)."""
        node.type = infer_type(node.op, node.inputs, node.attrs)

    def replace_all_uses(self, old: Node, new: Node) -> None:
        for n in self.nodes:
            if any(i is old for i in n.inputs):
                n.inputs = tuple(new if i is old else i for i in n.inputs)
        for key, out in self.outputs.items():
            if out is old:
                self.outputs[key] = new

    def erase(self, node: Node) -> None:
        if self.users(node) or node in self.outputs.values():
            raise ValueError(f"cannot erase {node!r}: it still has uses")
        self.nodes.remove(node)
        self._names.discard(node.name)
