"""The data the IR is made of: `TensorType` (a shape of possibly symbolic dims plus a dtype), the dim
arithmetic, and `Node` (one op application). `g4c.ir.ops` (the shape rules) and `g4c.ir.graph` (the
container) both build on this module; it imports neither.

Symbolic dims are strings: `T` (new tokens in this call), `P` (past tokens already in the KV cache)
and sums such as `P+T` (the keys a layer attends to). Decode graphs use the literal `T = 1`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Dim = int | str


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: str = "float32"

    def __str__(self) -> str:
        short = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "int64": "i64", "int32": "i32"}
        return f"{short.get(self.dtype, self.dtype)}[{', '.join(str(d) for d in self.shape)}]"

    @property
    def rank(self) -> int:
        return len(self.shape)


def dim_value(dim: Dim, env: dict[str, int]) -> int:
    """Evaluate a dim (`3`, `"T"`, `"P+T"`) with symbol values from `env`."""
    if isinstance(dim, int):
        return dim
    return sum(int(term) if term.isdigit() else env[term] for term in dim.split("+"))


def dim_add(a: Dim, b: Dim) -> Dim:
    """Symbolic a + b, kept in a canonical (sorted) form so equal sums compare equal."""
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    terms = [t for d in (a, b) for t in str(d).split("+")]
    const = sum(int(t) for t in terms if t.isdigit())
    symbols = sorted(t for t in terms if not t.isdigit())
    return "+".join(symbols + ([str(const)] if const else []))


def shape_value(shape: tuple[Dim, ...], env: dict[str, int]) -> tuple[int, ...]:
    return tuple(dim_value(d, env) for d in shape)


@dataclass(eq=False)
class Node:
    """One op application. `inputs` are earlier nodes; `attrs` are compile-time constants."""

    name: str
    op: str
    inputs: tuple["Node", ...]
    attrs: dict[str, Any]
    type: TensorType

    def __repr__(self) -> str:
        return f"%{self.name}"
