"""The pass manager: named graph rewrites, the default pipeline, verification and dumps after each pass.

A pass is a function `run(graph, ctx)` that rewrites `graph` in place (the manager hands it a copy).
Every pass lives in its own module with a docstring saying what it matches, what it produces and why
the rewrite is exact; `PassManager` verifies the IR after each one, records node counts, and can dump
the text form and DOT after chosen passes (`--dump-after PASS --dump-dir DIR`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from g4c.config import ModelConfig
from g4c.errors import G4CError
from g4c.ir import Graph, format_graph, verify, write_dot


@dataclass
class PassContext:
    """What a pass may consult besides the graph: the model config and (optionally) weight values."""

    cfg: ModelConfig
    weights: Callable[[str], np.ndarray] | None = None


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[Graph, PassContext], None]
    doc: str

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0] if self.doc else ""


@dataclass
class PassRecord:
    name: str
    nodes_before: int
    nodes_after: int


def _registry() -> dict[str, Pass]:
    from g4c.passes import PASS_MODULES

    return {m.PASS.name: m.PASS for m in PASS_MODULES}


def available_passes() -> dict[str, Pass]:
    return _registry()


# The pipeline every target runs; the order matters (fusions match the frontend's unfused patterns).
DEFAULT_PIPELINE = ("fuse_ple", "fuse_attention", "fuse_encoder_attention", "fuse_moe", "fuse_mlp", "fuse_lm_head",
                    "fuse_residual_norm", "fold_layer_scalar", "prune_kv_shared_prefill",
                    "plan_kv_cache", "cse", "dce")


def resolve_passes(spec: str) -> list[str]:
    """`all` (the default pipeline), `none`, or a comma-separated list of pass names."""
    spec = spec.strip()
    if spec == "all":
        return list(DEFAULT_PIPELINE)
    if spec == "none":
        return []
    names = [s.strip() for s in spec.split(",") if s.strip()]
    known = _registry()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise G4CError(f"unknown pass {unknown[0]!r}: available passes are {', '.join(known)}")
    return names


class PassManager:
    """Runs named passes in order on a copy of the graph, verifying after each."""

    def __init__(self, names: Iterable[str], dump_after: Iterable[str] = (), dump_dir: str | Path | None = None,
                 verify_each: bool = True):
        registry = _registry()
        self.passes = [registry[n] for n in names]
        self.dump_after = set(dump_after)
        unknown = self.dump_after - set(registry) - {"input"}
        if unknown:
            raise G4CError(f"--dump-after: unknown pass {sorted(unknown)[0]!r}")
        if self.dump_after and dump_dir is None:
            raise G4CError("--dump-after needs --dump-dir")
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.verify_each = verify_each
        self.records: list[PassRecord] = []

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        graph = graph.copy()
        self._dump("input", graph, 0)
        for step, p in enumerate(self.passes, start=1):
            before = len(graph)
            p.run(graph, ctx)
            if self.verify_each:
                verify(graph)
            self.records.append(PassRecord(p.name, before, len(graph)))
            self._dump(p.name, graph, step)
        graph.meta.setdefault("passes", []).extend(p.name for p in self.passes)
        return graph

    def _dump(self, name: str, graph: Graph, step: int) -> None:
        if name not in self.dump_after or self.dump_dir is None:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{graph.name}.{step:02d}.{name}"
        (self.dump_dir / f"{stem}.txt").write_text(format_graph(graph) + "\n")
        write_dot(graph, self.dump_dir / f"{stem}.dot", include_params=False)
