"""The reference interpreter: numpy fp32 execution of any g4c graph, with a KV-cache state.

This is the executable specification of every op in `g4c.ir.ops`. Passes are proven by running the
interpreter before and after; kernels are checked against it. It favours clarity over speed, but is
vectorised enough to run tiny models and short prompts in milliseconds.

KV state: `kv_cache` nodes append the new tokens' K (or V) to their slot and return the whole slot,
so prefill (T tokens after P = 0) followed by decode steps (T = 1) reproduces a full recompute.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from g4c.config import RopeSpec
from g4c.ir.graph import Graph, Node, shape_value

WeightGetter = Callable[[str], np.ndarray]


@dataclass
class KVState:
    """Per-slot cached tensors [S, H, D] (float32). All slots hold the same number of positions."""

    slots: dict[str, np.ndarray] = field(default_factory=dict)
    length: int = 0

    def reset(self) -> None:
        self.slots.clear()
        self.length = 0

    def copy(self) -> "KVState":
        return KVState({k: v.copy() for k, v in self.slots.items()}, self.length)

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.slots.values())


class Interpreter:
    """Runs a graph: `Interpreter(graph, weights).run(state, ids=..., positions=...)`.

    `weights` is a callable name → array (e.g. `Weights.f32`); arrays are used as float32."""

    def __init__(self, graph: Graph, weights: WeightGetter):
        self.graph = graph
        self.weights = weights

    def run(self, state: KVState | None = None, return_all: bool = False,
            **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Execute once. `inputs` are the graph's `input` nodes by name. Returns the outputs (or
        every node's value with `return_all`). The state advances by T positions on success."""
        state = state if state is not None else KVState()
        env = self._symbols(state, inputs)
        values: dict[Node, np.ndarray] = {}
        pending: dict[str, np.ndarray] = {}
        for node in self.graph.nodes:
            value = self._execute(node, values, inputs, state, pending, env)
            expected = shape_value(node.type.shape, env)
            if value.shape != expected:
                raise RuntimeError(f"%{node.name} ({node.op}) produced shape {value.shape}, type says {expected}")
            values[node] = value
        state.slots.update(pending)
        state.length = env["P"] + env["T"]
        if return_all:
            return {n.name: v for n, v in values.items()}
        return {key: values[node] for key, node in self.graph.outputs.items()}

    def _symbols(self, state: KVState, inputs: Mapping[str, np.ndarray]) -> dict[str, int]:
        missing = [n.attrs["name"] for n in self.graph.inputs if n.attrs["name"] not in inputs]
        if missing:
            raise ValueError(f"missing graph input {missing[0]!r}")
        first = self.graph.inputs[0]
        tokens = int(np.asarray(inputs[first.attrs["name"]]).shape[0])
        return {"T": tokens, "P": state.length}

    def _execute(self, node: Node, values, inputs, state: KVState, pending, env) -> np.ndarray:
        if node.op == "input":
            return np.asarray(inputs[node.attrs["name"]])
        if node.op == "param":
            return np.asarray(self.weights(node.attrs["name"]), dtype=np.float32)
        args = [values[i] for i in node.inputs]
        if node.op == "kv_cache":
            return _kv_cache(args[0], node.attrs["slot"], state, pending)
        if node.op == "reshape":
            return args[0].reshape(shape_value(tuple(node.attrs["shape"]), env))
        return KERNELS[node.op](*args, **node.attrs)


# ---- op kernels (numpy, float32) ---------------------------------------------------------------
def _f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def rms_norm(x: np.ndarray, weight: np.ndarray | None = None, *, eps: float) -> np.ndarray:
    x = _f32(x)
    out = x * np.power(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps), np.float32(-0.5))
    return out * weight if weight is not None else out


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    x = _f32(x)
    c = np.float32(np.sqrt(2.0 / np.pi))
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))


def rope(x: np.ndarray, positions: np.ndarray, *, rope_type: str, theta: float,
         partial_rotary_factor: float) -> np.ndarray:
    head_dim = x.shape[-1]
    inv_freq = RopeSpec(rope_type, theta, partial_rotary_factor).inv_freq(head_dim)
    freqs = np.asarray(positions, dtype=np.float32)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
    half = head_dim // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray, *, scaling: float,
              window: int | None) -> np.ndarray:
    """Causal GQA attention; query i sits at positions[i], key j at position j."""
    t, hq, d = q.shape
    s, hk, _ = k.shape
    group = hq // hk  # query head h reads KV head h // group (transformers' repeat_kv)
    kh = np.repeat(k, group, axis=1).transpose(1, 2, 0)  # [Hq, D, S]
    vh = np.repeat(v, group, axis=1).transpose(1, 0, 2)  # [Hq, S, D]
    scores = np.matmul(q.transpose(1, 0, 2), kh) * np.float32(scaling)  # [Hq, T, S]
    qpos = np.asarray(positions)[:, None]
    kpos = np.arange(s)[None, :]
    visible = kpos <= qpos
    if window is not None:
        visible &= (qpos - kpos) < window
    scores = np.where(visible[None], scores, -np.inf)
    probs = softmax(scores)
    return np.matmul(probs, vh).transpose(1, 0, 2).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    x = _f32(x)
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def topk(x: np.ndarray, *, k: int) -> np.ndarray:
    return np.argsort(-x, axis=-1, kind="stable")[..., :k].astype(np.int64)


def moe_experts(x: np.ndarray, idx: np.ndarray, w: np.ndarray, gate_up: np.ndarray,
                down: np.ndarray) -> np.ndarray:
    """Per expert: gather its tokens, gate_up → gelu(gate)·up → down, weight, scatter-add."""
    out = np.zeros_like(x, dtype=np.float32)
    inter = gate_up.shape[1] // 2
    for expert in np.unique(idx):
        tokens, slot = np.nonzero(idx == expert)
        h = x[tokens] @ gate_up[expert].T
        h = gelu_tanh(h[:, :inter]) * h[:, inter:]
        np.add.at(out, tokens, (h @ down[expert].T) * w[tokens, slot][:, None])
    return out


def _kv_cache(x: np.ndarray, slot: str, state: KVState, pending: dict[str, np.ndarray]) -> np.ndarray:
    past = state.slots.get(slot)
    full = x if past is None else np.concatenate([past, x], axis=0)
    pending[slot] = full
    return full


KERNELS: dict[str, Callable[..., np.ndarray]] = {
    "embedding": lambda table, ids: table[np.asarray(ids, dtype=np.int64)],
    "linear": lambda x, w: np.matmul(_f32(x), _f32(w).T),
    "add": lambda a, b: _f32(a) + _f32(b),
    "mul": lambda a, b: _f32(a) * _f32(b),
    "div": lambda a, b: _f32(a) / _f32(b),
    "scale": lambda x, value: _f32(x) * np.float32(value),
    "rms_norm": rms_norm,
    "gelu_tanh": gelu_tanh,
    "softcap": lambda x, cap: np.float32(cap) * np.tanh(_f32(x) / np.float32(cap)),
    "select": lambda x, axis, index: np.take(x, index, axis=axis),
    "take_last": lambda x, count: x[-count:],
    "rope": rope,
    "attention": attention,
    "softmax": softmax,
    "topk": topk,
    "take_along": lambda x, idx: np.take_along_axis(x, idx, axis=-1),
    "reduce_sum": lambda x: np.sum(_f32(x), axis=-1, keepdims=True),
    "moe_experts": moe_experts,
}
