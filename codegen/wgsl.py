"""Build the scheduled kernels to WGSL and record how to launch each one (for the wgpu runtime).

TVM's `webgpu` codegen emits WGSL; its own launcher lives in TVM's JavaScript runtime, so g4c records
what that launcher would compute, per device kernel, in the manifest:

- `buffers`: for each storage binding 0..k-1 (the device kernel's buffer parameters, in TVM's order),
  the index of the g4c kernel parameter it binds;
- `scalars`: the uniform `PODArgs` words, each a symbolic shape (parameter index, dimension);
- `grid`: the workgroup counts (blockIdx.x, blockIdx.y) as small expression trees over those scalars;
- the WGSL itself goes to `kernels.wgsl`, one `// Function: NAME` section per device kernel.

One g4c kernel may lower to several device kernels (launched in order). Grids wider than 65535 are
folded into z by the runtime; the kernel skips blocks past `packGridDimX` (grid width - 1).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from g4c.errors import G4CError


@dataclass
class Launch:
    kernel: str  # device function name (WGSL entry point)
    buffers: list[int]  # binding i ← kernel parameter buffers[i]
    scalars: list[tuple[int, int]]  # PODArgs word j ← dimension d of parameter p
    grid: list  # [x, y] workgroup counts, expression trees over the scalars
    threads: list[int]  # workgroup size (x, y, z), for the record

    def to_json(self) -> dict:
        return asdict(self)


_BINARY = {"Add": "+", "Sub": "-", "Mul": "*", "FloorDiv": "//", "FloorMod": "%", "Min": "min", "Max": "max"}


def _expr(e, scalars: list[str]):
    """A TIR integer expression as a JSON tree: ints, ["arg", j] (PODArgs word j), [op, a, b]."""
    from tvm import tirx

    if isinstance(e, tirx.IntImm):
        return int(e.value)
    if isinstance(e, tirx.Var):
        return ["arg", scalars.index(e.name)]
    if isinstance(e, tirx.Cast):
        return _expr(e.value, scalars)
    op = _BINARY.get(type(e).__name__)
    if op is None:
        raise G4CError(f"cannot record launch size {e} ({type(e).__name__})")
    return [op, _expr(e.a, scalars), _expr(e.b, scalars)]


def _device_launch(device_func, kernel) -> Launch:
    import tvm
    from tvm import tirx

    handles = [p for p in device_func.params if isinstance(p.ty, tvm.ir.PointerType)]
    scalars = [p for p in device_func.params if not isinstance(p.ty, tvm.ir.PointerType)]
    by_data = {f"{b.name}_ptr": i for i, b in enumerate(kernel.params)}
    by_data.update({b.name: i for i, b in enumerate(kernel.params)})
    shape_vars = {}
    for i, b in enumerate(kernel.params):
        for d, dim in enumerate(b.shape):
            if isinstance(dim, tirx.Var):
                shape_vars.setdefault(dim.name, (i, d))
    missing = [p.name for p in handles if p.name not in by_data] + [p.name for p in scalars if p.name not in shape_vars]
    if missing:
        raise G4CError(f"kernel {device_func.attrs['global_symbol']}: cannot map device parameters {missing}")
    names = [p.name for p in scalars]
    extents: dict[str, object] = {}
    for node in _statements(device_func.body):
        if isinstance(node, tirx.AttrStmt) and node.attr_key == "thread_extent":
            extents.setdefault(node.node.thread_tag, node.value)
    grid = [_expr(extents.get(tag, tirx.IntImm("int32", 1)), names) for tag in ("blockIdx.x", "blockIdx.y")]
    if "blockIdx.z" in extents:
        raise G4CError(f"kernel {device_func.attrs['global_symbol']} uses blockIdx.z, which WGSL grids reserve")
    threads = [int(extents[t].value) if t in extents else 1 for t in ("threadIdx.x", "threadIdx.y", "threadIdx.z")]
    return Launch(str(device_func.attrs["global_symbol"]), [by_data[p.name] for p in handles],
                  [shape_vars[p.name] for p in scalars], grid, threads)


def _statements(stmt):
    """Every statement under `stmt` (this TVM has no Python post-order visitor for TIR)."""
    yield stmt
    for field in ("body", "then_case", "else_case"):
        child = getattr(stmt, field, None)
        if child is not None and not isinstance(child, (int, float, str)):
            yield from _statements(child)
    for child in getattr(stmt, "seq", None) or ():
        yield from _statements(child)


def _call_order(host_func, device_names: set[str]) -> list[str]:
    """Device kernels in the order the host function launches them (their names are string literals
    of its packed calls, printed in program order)."""
    order: list[str] = []
    for literal in re.findall(r'"([A-Za-z0-9_]+)"', host_func.script()):
        if literal in device_names and literal not in order:
            order.append(literal)
    return order


def build(kernels: dict[str, object], target) -> tuple[str, dict[str, list[Launch]]]:
    """WGSL source of every kernel and the launches of each g4c kernel, in call order."""
    import tvm
    from tvm.tirx.build import split_host_device_mods, tir_to_runtime

    mod = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in kernels.items()})  # names are identifiers
    lowered = tvm.tirx.transform.BindTarget(target.with_host(target.host))(mod)
    pipeline, finalize_host, finalize_device = tvm.tirx.get_default_tir_pipeline(target)
    # no common-subexpression elimination: it would hand kernels host-computed values as parameters,
    # which the launch record could not express as shapes
    with tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        lowered = pipeline(lowered)
    host, devices = split_host_device_mods(lowered)
    device_funcs = {gv.name_hint: f for d in devices.values() for gv, f in d.functions.items()}
    launches = {}
    for name, kernel in kernels.items():
        order = _call_order(host[name], set(device_funcs))
        if not order:
            raise G4CError(f"kernel {name} has no GPU launch (is it scheduled?)")
        launches[name] = [_device_launch(device_funcs[d], kernel) for d in order]
    devices = {t: finalize_device()(d) for t, d in devices.items()}
    module = tir_to_runtime(finalize_host()(host), devices, target.host)
    return module.imports[0].inspect_source(), launches
