"""The layering docs/architecture.md describes, checked on the source: no import cycles, the compiler
slices import no runtime, the runtime imports no compiler and no `tvm`, device kinds are named only
by the targets."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"g4c": ROOT / "g4c", "g4c.ir": ROOT / "ir", "g4c.passes": ROOT / "passes",
            "g4c.codegen": ROOT / "codegen", "g4c.targets": ROOT / "targets"}
COMPILER = ("g4c.ir", "g4c.passes", "g4c.codegen", "g4c.targets", "g4c.frontend", "g4c.compiler", "g4c.reference",
            "g4c.vision", "g4c.audio", "g4c.multimodal")


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[0] in PACKAGES or (package == "g4c" and parts[0] in ("ir", "passes", "codegen", "targets")):
                continue
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


MODULES = _modules()


def _imports(path: Path, name: str) -> set[str]:
    """Every module `name` imports (module level and inside functions)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES}
    return out


GRAPH = nx.DiGraph()
GRAPH.add_nodes_from(MODULES)
GRAPH.add_edges_from((name, dep) for name, path in MODULES.items() for dep in _imports(path, name) if dep in MODULES
                     and dep != name and not name.startswith(dep + "."))


def _reaches(prefixes: tuple[str, ...], modules: list[str]) -> dict[str, str]:
    return {m: d for m in modules for d in GRAPH.successors(m) if d.startswith(prefixes)}


def test_no_import_cycles():
    assert list(nx.simple_cycles(GRAPH)) == []


def test_compiler_slices_import_no_runtime_cli_or_bench():
    compiler = [m for m in MODULES if m.startswith(("g4c.ir", "g4c.passes", "g4c.codegen", "g4c.targets"))]
    assert _reaches(("g4c.runtime", "g4c.cli", "g4c.bench"), compiler) == {}


def test_runtime_imports_no_compiler_and_no_tvm():
    runtime = [m for m in MODULES if m.startswith(("g4c.runtime", "g4c.artifact")) and m != "g4c.runtime.remote"]
    assert _reaches(COMPILER, runtime) == {}
    tvm = {m for m in runtime if any(d == "tvm" or d.startswith("tvm.") for d in _imports(MODULES[m], m))}
    assert tvm == set()


@pytest.mark.parametrize("kind", ["cuda", "metal", "vulkan", "arm", "llvm"])
def test_device_kinds_are_named_only_by_the_targets(kind):
    """String literals naming a target kind appear in g4c.targets only, and once in the CLI (its default)."""
    named = {}
    for name, path in MODULES.items():
        if name.startswith("g4c.targets"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and re.fullmatch(rf"{kind}(:.*)?", node.value):
                named.setdefault(name, []).append(node.lineno)
    allowed = {"g4c.cli": 1} if kind == "llvm" else {}
    assert {m: len(lines) for m, lines in named.items()} == allowed
