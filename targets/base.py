"""The Target abstraction: a name, the `tvm.target.Target`, default schedules and build options."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from g4c.errors import G4CError


@dataclass
class Target:
    name: str
    tvm_target: Callable[[], object]  # built lazily: creating targets needs the compiler
    schedule: Callable[[str, object], object]  # (kernel name, PrimFunc) → scheduled IRModule/PrimFunc
    library_suffix: str = ".so"
    options: dict = field(default_factory=dict)


def get_target(name: str) -> Target:
    from g4c.targets.llvm import host_target

    targets = {"llvm": host_target}
    if name not in targets:
        raise G4CError(f"unknown target {name!r}: available targets are {', '.join(targets)}")
    return targets[name]()
