"""fuse_ple — per-layer embeddings (PLE) as two fused ops.

Matches the model-level PLE inputs
    ple = scale(add(rms_norm(reshape(scale(linear(x, Wp), H^-0.5)), pn), reshape(scale(embedding(table, ids), √P))), 2^-0.5)
and produces `ple_inputs(ids, x, table, Wp, pn)` → [T, L, P]; the PLE table parameter is marked
`memory="host"`: it is only ever gathered (one row per token), so it stays off the accelerator,
memory-mapped. Then, per layer, matches the epilogue
    add(x, rms_norm(linear(mul(gelu_tanh(linear(x, Wg)), select(ple, 1, i)), Wproj), n))
and produces `ple_epilogue(x, ple, Wg, Wproj, n, index=i)`.

Exact: the fused reference kernels perform the same operations in the same order with the same
constants (taken from the matched `scale` nodes).
"""

from __future__ import annotations

from g4c.ir import Graph, Node
from g4c.passes.manager import Pass, PassContext
from g4c.passes.rewrite import NoMatch, expect, remove_unused


def run(graph: Graph, ctx: PassContext) -> None:
    for node in list(graph.nodes):
        if node.op == "embedding" and node in graph.nodes:
            try:
                _fuse_inputs(graph, node)
            except NoMatch:
                pass
    for select in [n for n in graph.nodes if n.op == "select"]:
        try:
            _fuse_epilogue(graph, select)
        except NoMatch:
            continue


def _only_user(graph: Graph, node: Node, op: str) -> Node:
    users = graph.users(node)
    if len(users) != 1 or users[0].op != op:
        raise NoMatch(f"%{node.name} is not used by exactly one {op}")
    return users[0]


def _fuse_inputs(graph: Graph, rows: Node) -> None:
    table, ids = rows.inputs
    rows_scaled = _only_user(graph, rows, "scale")
    rows_3d = _only_user(graph, rows_scaled, "reshape")
    mixed = _only_user(graph, rows_3d, "add")
    prj_norm, other = mixed.inputs
    if other is not rows_3d:
        raise NoMatch("unexpected PLE combine order")
    prj_3d, proj_norm = expect(prj_norm, "rms_norm", 2)
    (prj_scaled,) = expect(prj_3d, "reshape")
    (prj,) = expect(prj_scaled, "scale")
    x, w_proj = expect(prj, "linear")
    ple = _only_user(graph, mixed, "scale")
    _, layers, dim = ple.type.shape
    fused = graph.call("ple_inputs", ids, x, table, w_proj, proj_norm, eps=prj_norm.attrs["eps"],
                       table_scale=rows_scaled.attrs["value"], proj_scale=prj_scaled.attrs["value"],
                       mix_scale=ple.attrs["value"], layers=layers, dim=dim, name="ple_fused", before=ple)
    table.attrs["memory"] = "host"  # gathered row by row: keep it out of device memory
    graph.replace_all_uses(ple, fused)
    remove_unused(graph, [ple, mixed, prj_norm, prj_3d, prj_scaled, prj, rows_3d, rows_scaled, rows])


def _fuse_epilogue(graph: Graph, select: Node) -> None:
    (ple,) = select.inputs
    if select.attrs["axis"] != 1:
        raise NoMatch("not a per-layer slice")
    mix = _only_user(graph, select, "mul")
    act, other = mix.inputs
    if other is not select:
        raise NoMatch("unexpected PLE gate order")
    (gate,) = expect(act, "gelu_tanh")
    x, w_gate = expect(gate, "linear")
    proj = _only_user(graph, mix, "linear")
    normed = _only_user(graph, proj, "rms_norm")
    add = _only_user(graph, normed, "add")
    if add.inputs != (x, normed):
        raise NoMatch("PLE residual does not add to the gate input")
    fused = graph.call("ple_epilogue", x, ple, w_gate, proj.inputs[1], normed.inputs[1], eps=normed.attrs["eps"],
                       index=select.attrs["index"], name=f"{add.name.removesuffix('_res')}_fused", before=add)
    graph.replace_all_uses(add, fused)
    remove_unused(graph, [add, normed, proj, mix, act, gate, select])


PASS = Pass("fuse_ple", run, __doc__)
