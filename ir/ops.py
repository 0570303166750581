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
| rope_axial | x [T, H, D], positions [T, A] | theta | axial RoPE (vision): the head split in A parts, part a rotate_half-rotated at positions[:, a] |
| attention | q [T, Hq, D], k, v [S, Hk, D], positions [T] (, reach [T]) | scaling, window | GQA softmax(q kᵀ·s + mask) v; keys at positions 0..S-1; visible: key ≤ reach (default: the query's position, i.e. causal; an image's soft tokens reach the block's last position) and, with `window`, fewer than window positions back |
| pool_rows | x [T, D], index [S, k] | – | row s = mean of the k rows x[index[s]] (the vision pooler's k×k patches) |
| where_rows | mask [T], a [T, D], b [T, D] | – | row t = a[t] where mask[t] ≠ 0, else b[t] (soft tokens placed into the prompt) |
| softmax | x | – | over the last axis, fp32 |
| topk | x [..., E] | k | indices [..., k] of the k largest (descending) |
| take_along | x [..., E], idx [..., k] | – | `take_along_axis(x, idx, -1)` |
| reduce_sum | x | – | sum over the last axis, keepdims |
| moe_experts | x [T, H], idx [T, k], w [T, k], gate_up [E, 2I, H], down [E, H, I] | – | Σ_j w[t,j] · down[e](gelu(gate)·up) with e = idx[t,j] |
| concat | a, b, ... | axis | `np.concatenate` (packs weights, e.g. q/k/v into one GEMM) |
| conv2d | x [T, F, Cin], w [Cout, Cin, kh, kw], rows [T'] | stride, padding | 2-D convolution, channels last, zero padding, no bias; the output length T' is `rows`' length |
| layer_norm | x [..., C], w [C] | eps | `(x - mean) * (var + eps)^-0.5 * w` over the last axis (no bias) |
| relu, silu, softplus | x | – | `max(x, 0)`, `x·sigmoid(x)`, `log(1 + eˣ)` |
| clamp | x, lo [], hi [] | – | `min(max(x, lo), hi)` with scalar bounds (checkpoint buffers) |
| clip | x | limit | `clamp(x, -limit, limit)` (a compile-time bound) |
| glu | x [..., 2N] | – | `a · sigmoid(b)` of the halves a, b of the last axis |
| depthwise_conv1d | x [T, C], w [C, 1, K] | – | causal per-channel conv: `out[t, c] = Σ_j w[c, 0, j] · x[t - K + 1 + j, c]` (zeros before 0) |
| rel_positions | – | count, dim | [count, dim] sinusoids of the distances count-1 … 0: `[sin(p·f), cos(p·f)]`, f_i = 1e4^(-i/(dim/2-1)) |
| local_attention | q, k, v [S, H, D], rel_k [R, H, D] | chunk, context_left, context_right, softcap, invalid_logit | the audio tower's chunked attention (see `interpreter.local_attention`): blocks of `chunk` queries, each with the context_left-1 + chunk + context_right keys around; query t sees key s when 0 ≤ t-s < context_left-1 or 0 < s-t < context_right (transformers' mask); logits `softcap·tanh((q·k + rel_shift(q·rel_k)) / softcap)`, masked ones set to `invalid_logit`; softmax; · v |
| add_channels, mul_channels | x [..., C], w [C] | – | `x + w`, `x · w` along the last axis (the audio tower's output bias, its per-dim query scale) |

Fused ops (produced by `g4c.passes`; each is defined as the composition of the ops above):

| op | inputs | meaning |
|---|---|---|
| fused_attention | own: x, positions, in_norm, w_qkv, q_norm, k_norm, w_o; reuse: x, positions, in_norm, w_q, q_norm, w_o, donor (, donor k_norm); (, reach) when attr `reach` | o_proj(attention(rope(q_norm(q)), K, V)) of rms_norm(x, in_norm); own layers project, normalise, rotate and cache K/V (attrs `k_slot`, `v_slot`, `cache` full/ring, `slots`, `k_from_v`), reuse layers read the donor's slots |
| encoder_attention | x, xy [T, 2], positions, reach, in_norm, w_qkv, q_norm, k_norm, w_o | o_proj(attention(rope_axial(q_norm(q), xy), rope_axial(k_norm(k), xy), rms_norm(v), positions, reach)) of rms_norm(x, in_norm): a vision-encoder layer's attention, q/k/v from one GEMM |
| add_rms_norm | residual, y, w | `residual + rms_norm(y, w)` (sandwich norm + residual epilogue) |
| gated_mlp | x, norm, w_gate_up [2I, H], w_down | `down(gelu(gate) · up)` of `rms_norm(x, norm)`; gate/up are one GEMM |
| moe | r, router_scale, w_router, per_expert_scale, pre_norm, gate_up, down, post_norm | router + top-k + renormalise + per-expert scale + experts + post norm |
| ple_inputs | ids, x, table, w_proj, proj_norm | PLE rows + projection → [T, L, P] (the table lives in host memory) |
| ple_epilogue | x, ple [T, L, P], w_gate, w_proj, norm | `x + rms_norm((gelu(x @ gateᵀ) · ple[:, index]) @ projᵀ, norm)` |
| lm_head | x, norm, w | `softcap(rms_norm(x, norm) @ wᵀ)` (softcap None: none) |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from g4c.ir.types import Dim, Node, TensorType, dim_add


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


def _rope_axial(inputs, attrs) -> TensorType:
    x, positions = inputs
    (t, _, d), axes = x.type.shape, positions.type.shape[-1]
    if x.type.rank != 3 or positions.type.shape != (t, axes) or d % (2 * axes):
        raise IRTypeError(f"rope_axial: needs x [T, H, D] and positions [T, A] with D divisible by 2A, got "
                          f"{x.type} and {positions.type}")
    return x.type


def _pool_rows(inputs, attrs) -> TensorType:
    x, index = inputs
    if x.type.rank != 2 or index.type.rank != 2 or index.type.dtype not in ("int64", "int32"):
        raise IRTypeError(f"pool_rows: needs x [T, D] and integer index [S, k], got {x.type} and {index.type}")
    return TensorType((index.type.shape[0], x.type.shape[1]), "float32")


def _where_rows(inputs, attrs) -> TensorType:
    mask, a, b = inputs
    if a.type.shape != b.type.shape or a.type.rank != 2 or mask.type.shape != (a.type.shape[0],):
        raise IRTypeError(f"where_rows: needs mask [T], a and b [T, D], got {mask.type}, {a.type}, {b.type}")
    return a.type


def _kv_cache(inputs, attrs) -> TensorType:
    t, h, d = inputs[0].type.shape
    return TensorType((dim_add("P", t), h, d), inputs[0].type.dtype)


def _attention(inputs, attrs) -> TensorType:
    q, k, v, positions = inputs[:4]
    (t, hq, d), (_, hk, dk) = q.type.shape, k.type.shape
    if k.type.shape != v.type.shape or d != dk or hq % hk or any(p.type.shape != (t,) for p in inputs[3:]):
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


def _concat(inputs, attrs) -> TensorType:
    axis = attrs["axis"]
    first = inputs[0].type.shape
    if any(len(i.type.shape) != len(first) or i.type.shape[:axis] + i.type.shape[axis + 1:] !=
           first[:axis] + first[axis + 1:] for i in inputs):
        raise IRTypeError(f"concat: shapes {[list(i.type.shape) for i in inputs]} differ off axis {axis}")
    total = sum(i.type.shape[axis] for i in inputs)
    return TensorType(first[:axis] + (total,) + first[axis + 1:], inputs[0].type.dtype)


def _rows_like_x(inputs, attrs) -> TensorType:
    """Fused blocks that map the residual stream x [T, H] to [T, H]."""
    return TensorType(inputs[0].type.shape, "float32")


def _fused_attention(inputs, attrs) -> TensorType:
    x, w_o = inputs[0], inputs[5 if attrs["role"] == "reuse" else 6]
    if w_o.type.shape != (x.type.shape[-1], attrs["q_heads"] * attrs["head_dim"]):
        raise IRTypeError(f"fused_attention: o_proj {w_o.type} does not fit x {x.type} and "
                          f"{attrs['q_heads']}x{attrs['head_dim']} heads")
    return TensorType(x.type.shape, "float32")


def _ple_inputs(inputs, attrs) -> TensorType:
    return TensorType((inputs[0].type.shape[0], attrs["layers"], attrs["dim"]), "float32")


def _lm_head(inputs, attrs) -> TensorType:
    return TensorType(inputs[0].type.shape[:-1] + (inputs[2].type.shape[0],), "float32")


def _conv2d(inputs, attrs) -> TensorType:
    x, w, rows = inputs
    if x.type.rank != 3 or w.type.rank != 4 or rows.type.rank != 1 or x.type.shape[2] != w.type.shape[1] \
            or not isinstance(x.type.shape[1], int):
        raise IRTypeError(f"conv2d: needs x [T, F, Cin], w [Cout, Cin, kh, kw] and rows [T'], got {x.type}, "
                          f"{w.type}, {rows.type}")
    freq = (x.type.shape[1] + 2 * attrs["padding"] - w.type.shape[3]) // attrs["stride"] + 1
    return TensorType((rows.type.shape[0], freq, w.type.shape[0]), "float32")


def _layer_norm(inputs, attrs) -> TensorType:
    x, w = inputs
    if w.type.shape != (x.type.shape[-1],):
        raise IRTypeError(f"layer_norm: weight {w.type} does not match x {x.type}")
    return x.type


def _clamp(inputs, attrs) -> TensorType:
    if any(b.type.shape not in ((), (1,)) for b in inputs[1:]):
        raise IRTypeError(f"clamp: bounds must be scalars, got {[str(b.type) for b in inputs[1:]]}")
    return inputs[0].type


def _glu(inputs, attrs) -> TensorType:
    x = inputs[0].type
    if not isinstance(x.shape[-1], int) or x.shape[-1] % 2:
        raise IRTypeError(f"glu: the last axis of {x} must have an even size")
    return TensorType(x.shape[:-1] + (x.shape[-1] // 2,), x.dtype)


def _depthwise_conv1d(inputs, attrs) -> TensorType:
    x, w = inputs
    if x.type.rank != 2 or w.type.rank != 3 or w.type.shape[:2] != (x.type.shape[1], 1):
        raise IRTypeError(f"depthwise_conv1d: needs x [T, C] and w [C, 1, K], got {x.type} and {w.type}")
    return x.type


def _rel_positions(inputs, attrs) -> TensorType:
    if attrs["dim"] % 2:
        raise IRTypeError(f"rel_positions: dim {attrs['dim']} must be even (sin and cos halves)")
    return TensorType((attrs["count"], attrs["dim"]), "float32")


def _local_attention(inputs, attrs) -> TensorType:
    q, k, v, rel_k = inputs
    width = attrs["chunk"] + attrs["context_left"] - 1 + attrs["context_right"]
    if k.type != q.type or v.type != q.type or q.type.rank != 3 or rel_k.type.shape[1:] != q.type.shape[1:] \
            or rel_k.type.shape[0] > width + 1:
        raise IRTypeError(f"local_attention: q {q.type}, k {k.type}, v {v.type}, rel_k {rel_k.type} do not fit "
                          f"(rel_k needs at most {width + 1} rows)")
    return q.type


def _channels(inputs, attrs) -> TensorType:
    x, w = inputs
    if w.type.shape != (x.type.shape[-1],):
        raise IRTypeError(f"add_channels/mul_channels: w {w.type} does not match the last axis of x {x.type}")
    return TensorType(x.type.shape, "float32")


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
    "rope_axial": OpDef((2,), ("theta",), _rope_axial),
    "attention": OpDef((4, 5), ("scaling", "window"), _attention),
    "pool_rows": OpDef((2,), (), _pool_rows),
    "where_rows": OpDef((3,), (), _where_rows),
    "softmax": OpDef((1,), (), _same),
    "topk": OpDef((1,), ("k",), _topk),
    "take_along": OpDef((2,), (), _take_along),
    "reduce_sum": OpDef((1,), (), _reduce_sum),
    "moe_experts": OpDef((5,), (), _moe_experts),
    "concat": OpDef(tuple(range(2, 9)), ("axis",), _concat),
    # audio tower (g4c.audio)
    "conv2d": OpDef((3,), ("stride", "padding"), _conv2d),
    "layer_norm": OpDef((2,), ("eps",), _layer_norm),
    "relu": OpDef((1,), (), _same),
    "silu": OpDef((1,), (), _same),
    "softplus": OpDef((1,), (), _same),
    "clamp": OpDef((3,), (), _clamp),
    "clip": OpDef((1,), ("limit",), _same),
    "glu": OpDef((1,), (), _glu),
    "depthwise_conv1d": OpDef((2,), (), _depthwise_conv1d),
    "rel_positions": OpDef((0,), ("count", "dim"), _rel_positions),
    "local_attention": OpDef((4,), ("chunk", "context_left", "context_right", "softcap", "invalid_logit"),
                             _local_attention),
    "add_channels": OpDef((2,), (), _channels),
    "mul_channels": OpDef((2,), (), _channels),
    # fused ops
    "fused_attention": OpDef((7, 8, 9), ("role", "layer", "kind", "window", "head_dim", "q_heads", "kv_heads",
                                      "rope_type", "theta", "partial_rotary_factor", "eps", "kv_source",
                                      "k_eq_v", "k_slot", "v_slot"), _fused_attention),
    "encoder_attention": OpDef((9,), ("q_heads", "kv_heads", "head_dim", "eps", "theta"), _rows_like_x),
    "add_rms_norm": OpDef((3,), ("eps",), _rows_like_x),
    "gated_mlp": OpDef((4,), ("eps",), _rows_like_x),
    "moe": OpDef((8,), ("eps", "top_k", "router_input_scale"), _rows_like_x),
    "ple_inputs": OpDef((5,), ("eps", "table_scale", "proj_scale", "mix_scale", "layers", "dim"), _ple_inputs),
    "ple_epilogue": OpDef((5,), ("eps", "index"), _rows_like_x),
    "lm_head": OpDef((3,), ("eps", "softcap"), _lm_head),
}

# Ops that read or write the KV state: never removed or merged by clean-up passes.
STATEFUL_OPS = frozenset({"kv_cache", "fused_attention"})


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
