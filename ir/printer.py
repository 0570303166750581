"""Text and DOT forms of a graph (for humans, `--dump-after`, and `g4c graph`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from g4c.ir.graph import Graph, Node


def _attr(value: Any) -> str:
    if isinstance(value, float):
        return repr(round(value, 8))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_attr(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def format_node(node: Node) -> str:
    args = ", ".join(f"%{i.name}" for i in node.inputs)
    attrs = ", ".join(f"{k}={_attr(v)}" for k, v in node.attrs.items())
    inner = ", ".join(p for p in (args, attrs) if p)
    return f"%{node.name} = {node.op}({inner}) : {node.type}"


def format_graph(graph: Graph) -> str:
    """One line per node, torch.fx style; params and inputs first as they appear."""
    head = ", ".join(f"%{n.name}: {n.type}" for n in graph.inputs)
    lines = [f"graph {graph.name}({head}) {{"]
    lines += [f"  {format_node(n)}" for n in graph.nodes if n.op != "input"]
    lines.append("  return " + ", ".join(f"{k}=%{v.name}" for k, v in graph.outputs.items()))
    lines.append("}")
    return "\n".join(lines)


def to_dot(graph: Graph, include_params: bool = True):
    """A `pydot.Dot` of the dataflow graph (built from the networkx view)."""
    import networkx as nx

    g = graph.to_networkx()
    if not include_params:
        g.remove_nodes_from([n.name for n in graph.params])
    dot_graph = nx.DiGraph(name=graph.name)
    for name, data in g.nodes(data=True):
        label = f"{name}\\n{data['op']} {data['type']}"
        shape = {"param": "note", "input": "invhouse"}.get(data["op"], "box")
        dot_graph.add_node(_quote(name), label=f'"{label}"', shape=shape)
    for a, b in g.edges:
        dot_graph.add_edge(_quote(a), _quote(b))
    for key, out in graph.outputs.items():
        dot_graph.add_edge(_quote(out.name), _quote(f"output:{key}"))
        dot_graph.nodes[_quote(f"output:{key}")].update(shape="house", label=f'"{key}"')
    return nx.nx_pydot.to_pydot(dot_graph)


def _quote(name: str) -> str:
    return f'"{name}"'


def write_dot(graph: Graph, path: str | Path, fmt: str = "dot", include_params: bool = True) -> None:
    """Write DOT source, or render `svg`/`png` with graphviz's `dot` (must be installed)."""
    import shutil

    from g4c.errors import G4CError

    dot = to_dot(graph, include_params)
    if fmt == "dot":
        Path(path).write_text(dot.to_string())
        return
    if fmt not in ("svg", "png"):
        raise G4CError(f"unknown graph format {fmt!r}: use dot, svg or png")
    if shutil.which("dot") is None:
        raise G4CError(f"--format {fmt} needs graphviz's `dot` (apt-get install graphviz); --format dot works without it")
    Path(path).write_bytes(dot.create(format=fmt))
