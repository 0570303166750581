"""The closed op set of the g4c IR, in one place: arity, required attrs and the shape rule of each op.

Semantics (executed by `g4c.ir.interpreter.Interpreter`, the reference) in brief:

| op | inputs | attrs | meaning |
|---|---|---|---|
| input | – | name | a runtime input (`ids`, `positions`) |
| param | – | name | a weight, by canonical checkpoint name |
| embedding | table [V, ...], ids [...] | – | rows `table[ids]` (any ids shape) |
| linear | x [..., K], w [N, K] | – | `x @ w.T` (HF `nn.Linear` layout) |
| add, mul, div | a, b | – | elementwise with numpy broadcasting |
| scale | x | value | `x * value` (a compile-time float) |
| rms_norm | x [..., D] (, w [D]) | eps | `x * (mean(x²) + eps)^-0.5 (* w)` in fp32 |
| gelu_tanh | x | – | tanh-approximated GELU |
| softcap | x | cap | `cap * tanh(x / cap)` |
| reshape | x | shape | same elements, new shape |
| select | x | axis, index | `x.take(index, axis)` (drops the axis) |
| take_last | x [T, ...] | count | the last `count` rows |
| rope | x [T, H, D], positions [T] | rope_type, theta, partial_rotary_factor | rotate_half RoPE |
| kv_cache | x [T, H, D] | slot | append to the cache slot; returns all [P+T, H, D] |
| attention | q [T, Hq, D], k, v [S, Hk, D], positions [T] | scaling, window | causal GQA softmax(q kᵀ·s + mask) v; keys at positions 0..S-1; `window` masks keys ≥ window positions back |
| softmax | x | – | over the last axis, fp32 |
| topk | x [..., E] | k | indices [..., k] of the k largest (descending) |
| take_along | x [..., E], idx [..., k] | – | `take_along_axis(x, idx, -1)` |
| reduce_sum | x | – | sum over the last axis, keepdims |
| moe_experts | x [T, H], idx [T, k], w [T, k], gate_up [E, 2I, H], down [E, H, I] | – | Σ_j w[t,j] · down[e](gelu(gate)·up) with e = idx[t,j] |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from g4c.ir.graph import Dim, Node, TensorType, dim_add


class IRTypeError(ValueError):
    """An op applied to inputs of the wrong shape/arity, or missing attrs."""


@dataclass(frozen=True)
class OpDef:
    arity: tuple[int, ...]  # allowed input counts
    attrs: tuple[str, ...]  # required attrs
    infer: Callable[[tuple[Node, ...], dict[str, Any]], TensorType] | None  # None: type is given


def _same(inputs, attrs) -> TensorType:
    return inputs[0].type


def _broadcast(inputs, attrs) -> TensorType:
    a, b = inputs[0].type.shape, inputs[1].type.shape
    out: list[Dim] = []
    for i in range(1, max(len(a), len(b)) + 1):
        da = a[-i] if i <= len(a) else 1
        db = b[-i] if i <= len(b) else 1
        if da != db and 1 not in (da, db):
            raise IRTypeError(f"cannot broadcast {list(a)} with {list(b)}")
        out.append(db if da == 1 else da)
    return TensorType(tuple(reversed(out)), inputs[0].type.dtype)


def _embedding(inputs, attrs) -> TensorType:
    table, ids = inputs
    if ids.type.dtype not in ("int64", "int32"):
        raise IRTypeError(f"embedding needs integer ids, got {ids.type}")
    return TensorType(ids.type.shape + table.type.shape[1:], "float32")


def _linear(inputs, attrs) -> TensorType:
    x, w = inputs
    if w.type.rank != 2 or x.type.shape[-1] != w.type.shape[1]:
        raise IRTypeError(f"linear: x {x.type} does not match weight {w.type} (expects [..., K] @ [N, K]ᵀ)")
    return TensorType(x.type.shape[:-1] + (w.type.shape[0],), "float32")


def _rms_norm(inputs, attrs) -> TensorType:
    if len(inputs) == 2 and inputs[1].type.shape != (inputs[0].type.shape[-1],):
        raise IRTypeError(f"rms_norm: weight {inputs[1].type} does not match x {inputs[0].type}")
    return inputs[0].type


def _reshape(inputs, attrs) -> TensorType:
    new = tuple(attrs["shape"])
    if not _same_numel(inputs[0].type.shape, new):
        raise IRTypeError(f"reshape: {list(inputs[0].type.shape)} → {list(new)} changes the element count")
    return TensorType(new, inputs[0].type.dtype)


def _same_numel(a: tuple[Dim, ...], b: tuple[Dim, ...]) -> bool:
    def split(shape):
        const, symbols = 1, []
        for d in shape:
            if isinstance(d, int):
                const *= d
            else:
                symbols.append(d)
        return const, sorted(symbols)

    return split(a) == split(b)


def _select(inputs, attrs) -> TensorType:
    shape = list(inputs[0].type.shape)
    axis, size = attrs["axis"], shape[attrs["axis"]]
    if isinstance(size, int) and not 0 <= attrs["index"] < size:
        raise IRTypeError(f"select: index {attrs['index']} out of range for axis {axis} of {inputs[0].type}")
    del shape[axis]
    return TensorType(tuple(shape), inputs[0].type.dtype)


def _take_last(inputs, attrs) -> TensorType:
    return TensorType((attrs["count"],) + inputs[0].type.shape[1:], inputs[0].type.dtype)


def _rope(inputs, attrs) -> TensorType:
    x, positions = inputs
    if x.type.rank != 3 or positions.type.shape != (x.type.shape[0],):
        raise IRTypeError(f"rope: needs x [T, H, D] and positions [T], got {x.type} and {positions.type}")
    return x.type


def _kv_cache(inputs, attrs) -> TensorType:
    t, h, d = inputs[0].type.shape
    return TensorType((dim_add("P", t), h, d), inputs[0].type.dtype)


def _attention(inputs, attrs) -> TensorType:
    q, k, v, positions = inputs
    (t, hq, d), (s, hk, dk) = q.type.shape, k.type.shape
    if k.type.shape != v.type.shape or d != dk or hq % hk or positions.type.shape != (t,):
        raise IRTypeError(f"attention: q {q.type}, k {k.type}, v {v.type}, positions {positions.type} do not fit")
    return q.type


def _topk(inputs, attrs) -> TensorType:
    return TensorType(inputs[0].type.shape[:-1] + (attrs["k"],), "int64")


def _take_along(inputs, attrs) -> TensorType:
    return TensorType(inputs[1].type.shape, inputs[0].type.dtype)


def _reduce_sum(inputs, attrs) -> TensorType:
    return TensorType(inputs[0].type.shape[:-1] + (1,), inputs[0].type.dtype)


def _moe_experts(inputs, attrs) -> TensorType:
    x, idx, w, gate_up, down = inputs
    e, two_i, h = gate_up.type.shape
    if down.type.shape != (e, h, two_i // 2) or x.type.shape[-1] != h or idx.type.shape != w.type.shape:
        raise IRTypeError(f"moe_experts: x {x.type}, gate_up {gate_up.type}, down {down.type} do not fit")
    return x.type


OPS: dict[str, OpDef] = {
    "input": OpDef((0,), ("name",), None),
    "param": OpDef((0,), ("name",), None),
    "embedding": OpDef((2,), (), _embedding),
    "linear": OpDef((2,), (), _linear),
    "add": OpDef((2,), (), _broadcast),
    "mul": OpDef((2,), (), _broadcast),
    "div": OpDef((2,), (), _broadcast),
    "scale": OpDef((1,), ("value",), _same),
    "rms_norm": OpDef((1, 2), ("eps",), _rms_norm),
    "gelu_tanh": OpDef((1,), (), _same),
    "softcap": OpDef((1,), ("cap",), _same),
    "reshape": OpDef((1,), ("shape",), _reshape),
    "select": OpDef((1,), ("axis", "index"), _select),
    "take_last": OpDef((1,), ("count",), _take_last),
    "rope": OpDef((2,), ("rope_type", "theta", "partial_rotary_factor"), _rope),
    "kv_cache": OpDef((1,), ("slot",), _kv_cache),
    "attention": OpDef((4,), ("scaling", "window"), _attention),
    "softmax": OpDef((1,), (), _same),
    "topk": OpDef((1,), ("k",), _topk),
    "take_along": OpDef((2,), (), _take_along),
    "reduce_sum": OpDef((1,), (), _reduce_sum),
    "moe_experts": OpDef((5,), (), _moe_experts),
}


def check_signature(op: str, inputs: tuple[Node, ...], attrs: dict[str, Any]) -> OpDef:
    if op not in OPS:
        raise IRTypeError(f"unknown op {op!r}")
    spec = OPS[op]
    if len(inputs) not in spec.arity:
        raise IRTypeError(f"{op}: expected {' or '.join(map(str, spec.arity))} inputs, got {len(inputs)}")
    missing = [a for a in spec.attrs if a not in attrs]
    if missing:
        raise IRTypeError(f"{op}: missing attr {missing[0]!r}")
    return spec


def infer_type(op: str, inputs: tuple[Node, ...], attrs: dict[str, Any]) -> TensorType:
    """The output type of `op` applied to `inputs` (raises `IRTypeError` when they do not fit)."""
    spec = check_signature(op, inputs, attrs)
    if spec.infer is None:
        raise IRTypeError(f"{op} nodes are created with Graph.input/Graph.param, which give their type")
    return spec.infer(inputs, attrs)
