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
    """Per-slot cached tensors [S, H, D] (float32). `length` positions have been processed; a slot
    holds positions `starts[slot] .. starts[slot] + S - 1` (a ring buffer keeps only the newest)."""

    slots: dict[str, np.ndarray] = field(default_factory=dict)
    length: int = 0
    starts: dict[str, int] = field(default_factory=dict)

    def reset(self) -> None:
        self.slots.clear()
        self.starts.clear()
        self.length = 0

    def copy(self) -> "KVState":
        return KVState({k: v.copy() for k, v in self.slots.items()}, self.length, dict(self.starts))

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.slots.values())


class HostTable:
    """A table parameter kept in host memory (`memory="host"`): indexing fetches only those rows."""

    def __init__(self, name: str, shape: tuple[int, ...], fetch: Callable[[str, np.ndarray], np.ndarray]):
        self.name, self.shape, self._fetch = name, shape, fetch

    def __getitem__(self, ids) -> np.ndarray:
        return self._fetch(self.name, np.asarray(ids, dtype=np.int64).reshape(-1))


class Interpreter:
    """Runs a graph: `Interpreter(graph, weights).run(state, ids=..., positions=...)`.

    `weights` is a callable name → array (e.g. `Weights.f32`); arrays are used as float32.
    `rows` (name, ids → rows) serves parameters marked `memory="host"` row by row, as a device
    runtime fetches PLE rows; without it those tables are read whole through `weights`."""

    def __init__(self, graph: Graph, weights: WeightGetter,
                 rows: Callable[[str, np.ndarray], np.ndarray] | None = None):
        self.graph = graph
        self.weights = weights
        self.rows = rows
        self.capacity = {n.attrs[key]: n.attrs["slots"] for n in graph.nodes
                         if n.op == "fused_attention" and n.attrs.get("cache") == "ring"
                         for key in ("k_slot", "v_slot")}

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
            if tuple(value.shape) != expected:
                raise RuntimeError(f"%{node.name} ({node.op}) produced shape {value.shape}, type says {expected}")
            values[node] = value
        for slot, (start, rows) in pending.items():
            drop = max(0, rows.shape[0] - self.capacity.get(slot, rows.shape[0]))  # ring buffers keep the newest
            state.slots[slot], state.starts[slot] = rows[drop:], start + drop
        state.length = env["P"] + env["T"]
        if return_all:
            return {n.name: v for n, v in values.items()}
        return {key: values[node] for key, node in self.graph.outputs.items()}

    def _symbols(self, state: KVState, inputs: Mapping[str, np.ndarray]) -> dict[str, int]:
        missing = [n.attrs["name"] for n in self.graph.inputs if n.attrs["name"] not in inputs]
        if missing:
            raise ValueError(f"missing graph input {missing[0]!r}")
        first = self.graph.inputs[0]
        env = {"P": state.length}
        tokens = int(np.shape(inputs[first.attrs["name"]])[0])  # the call's new tokens (decode: T = 1, literal)
        for node in self.graph.inputs:  # every bare symbolic dim of an input is bound by its array
            shape = np.shape(inputs[node.attrs["name"]])
            for dim, size in zip(node.type.shape, shape):
                if isinstance(dim, str) and dim.isidentifier():
                    if env.setdefault(dim, int(size)) != int(size):
                        raise ValueError(f"input {node.attrs['name']!r}: {dim} = {size}, another input says {env[dim]}")
        env.setdefault("T", tokens)
        return env

    def _execute(self, node: Node, values, inputs, state: KVState, pending, env) -> np.ndarray:
        if node.op == "input":
            return np.asarray(inputs[node.attrs["name"]])
        if node.op == "param":
            if self.rows is not None and node.attrs.get("memory") == "host":
                return HostTable(node.attrs["name"], shape_value(node.type.shape, env), self.rows)
            return np.asarray(self.weights(node.attrs["name"]), dtype=np.float32)
        args = [values[i] for i in node.inputs]
        if node.op == "kv_cache":  # unfused caches hold every position from 0
            return _append(_SlotView(state, pending), node.attrs["slot"], args[0], 0)[1]
        if node.op == "fused_attention":
            return fused_attention(args, node.attrs, _SlotView(state, pending))
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


def rope_axial(x: np.ndarray, positions: np.ndarray, *, theta: float) -> np.ndarray:
    """Axial RoPE: part a of each head (D/A channels) rotated at positions[:, a] (transformers'
    `apply_multidimensional_rope` with the vision tower's per-part frequencies)."""
    axes = positions.shape[1]
    part = x.shape[-1] // axes
    rope_attrs = dict(rope_type="default", theta=theta, partial_rotary_factor=1.0)
    return np.concatenate([rope(x[..., a * part:(a + 1) * part], positions[:, a], **rope_attrs)
                           for a in range(axes)], axis=-1)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray, reach: np.ndarray | None = None,
              *, scaling: float, window: int | None, key_start: int = 0) -> np.ndarray:
    """GQA attention; query i sits at positions[i] and sees keys up to reach[i] (default: causal,
    reach = positions), key j at position key_start + j."""
    t, hq, d = q.shape
    s, hk, _ = k.shape
    group = hq // hk  # query head h reads KV head h // group (transformers' repeat_kv)
    kh = np.repeat(k, group, axis=1).transpose(1, 2, 0)  # [Hq, D, S]
    vh = np.repeat(v, group, axis=1).transpose(1, 0, 2)  # [Hq, S, D]
    scores = np.matmul(q.transpose(1, 0, 2), kh) * np.float32(scaling)  # [Hq, T, S]
    qpos = np.asarray(positions)[:, None]
    kpos = key_start + np.arange(s)[None, :]
    visible = kpos <= (qpos if reach is None else np.asarray(reach)[:, None])
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


class _SlotView:
    """Cache slots as seen during one run: this run's writes (pending) over the committed state."""

    def __init__(self, state: KVState, pending: dict[str, tuple[int, np.ndarray]]):
        self.state, self.pending = state, pending

    def read(self, slot: str) -> tuple[int, np.ndarray | None]:
        if slot in self.pending:
            return self.pending[slot]
        return self.state.starts.get(slot, 0), self.state.slots.get(slot)

    def write(self, slot: str, start: int, rows: np.ndarray) -> None:
        self.pending[slot] = (start, rows)


def _gqa_out(q, k, v, positions, attrs, key_start, w_o, reach=None) -> np.ndarray:
    out = attention(q, k, v, positions, reach, scaling=1.0, window=attrs["window"], key_start=key_start)
    return np.matmul(out.reshape(out.shape[0], -1), w_o.T)


def fused_attention(args: list[np.ndarray], attrs: dict, slots: _SlotView) -> np.ndarray:
    """One layer's attention block; see `g4c.ir.ops` for the input layout by role."""
    rope_attrs = {k: attrs[k] for k in ("rope_type", "theta", "partial_rotary_factor")}
    eps, hd, nh, nkv = attrs["eps"], attrs["head_dim"], attrs["q_heads"], attrs["kv_heads"]
    x, positions, in_norm = args[0], args[1], args[2]
    reach = args.pop() if attrs.get("reach") else None  # a media prompt's sliding layer: its last input
    h = rms_norm(x, in_norm, eps=eps)
    t = h.shape[0]
    if attrs["role"] == "reuse":
        w_q, q_norm, w_o = args[3], args[4], args[5]
        q = rope(rms_norm((h @ w_q.T).reshape(t, nh, hd), q_norm, eps=eps), positions, **rope_attrs)
        k, v, start = _read_kv(attrs, slots, args[7] if len(args) > 7 else None, rope_attrs)
        return _gqa_out(q, k, v, positions, attrs, start, w_o, reach)
    w_qkv, q_norm, k_norm, w_o = args[3], args[4], args[5], args[6]
    proj = h @ w_qkv.T
    q = rope(rms_norm(proj[:, : nh * hd].reshape(t, nh, hd), q_norm, eps=eps), positions, **rope_attrs)
    k_raw = proj[:, nh * hd: (nh + nkv) * hd].reshape(t, nkv, hd)
    v_raw = k_raw if attrs["k_eq_v"] else proj[:, (nh + nkv) * hd:].reshape(t, nkv, hd)
    k_new = rope(rms_norm(k_raw, k_norm, eps=eps), positions, **rope_attrs)
    v_new = rms_norm(v_raw, eps=eps)
    start, v_all = _append(slots, attrs["v_slot"], v_new, int(positions[0]))
    if attrs.get("k_from_v"):  # k = rope(v * k_norm): exact, since rms_norm(x, w) == rms_norm(x) * w
        k_all = rope(v_all * k_norm, start + np.arange(v_all.shape[0]), **rope_attrs)
    else:
        _, k_all = _append(slots, attrs["k_slot"], k_new, int(positions[0]))
    return _gqa_out(q, k_all, v_all, positions, attrs, start, w_o, reach)


def encoder_attention(x, xy, positions, reach, in_norm, w_qkv, q_norm, k_norm, w_o, *, q_heads: int, kv_heads: int,
                      head_dim: int, eps: float, theta: float) -> np.ndarray:
    """A vision-encoder layer's attention block (see `g4c.ir.ops`)."""
    h = rms_norm(x, in_norm, eps=eps)
    proj = h @ w_qkv.T
    t, q_width, kv_width = h.shape[0], q_heads * head_dim, kv_heads * head_dim
    q = rope_axial(rms_norm(proj[:, :q_width].reshape(t, q_heads, head_dim), q_norm, eps=eps), xy, theta=theta)
    k = rope_axial(rms_norm(proj[:, q_width:q_width + kv_width].reshape(t, kv_heads, head_dim), k_norm, eps=eps), xy,
                   theta=theta)
    v = rms_norm(proj[:, q_width + kv_width:].reshape(t, kv_heads, head_dim), eps=eps)
    out = attention(q, k, v, positions, reach, scaling=1.0, window=None)
    return out.reshape(t, -1) @ w_o.T


def _append(slots: _SlotView, slot: str, new: np.ndarray, first_position: int) -> tuple[int, np.ndarray]:
    start, past = slots.read(slot)
    rows = new if past is None else np.concatenate([past, new], axis=0)
    start = first_position if past is None else start
    slots.write(slot, start, rows)
    return start, rows


def _read_kv(attrs: dict, slots: _SlotView, donor_k_norm: np.ndarray | None, rope_attrs: dict):
    start, v = slots.read(attrs["v_slot"])
    if attrs.get("k_from_v"):
        k = rope(v * donor_k_norm, start + np.arange(v.shape[0]), **rope_attrs)
    else:
        _, k = slots.read(attrs["k_slot"])
    return k, v, start


def gated_mlp(x, norm, w_gate_up, w_down, *, eps: float) -> np.ndarray:
    h = rms_norm(x, norm, eps=eps) @ w_gate_up.T
    inter = w_gate_up.shape[0] // 2
    return (gelu_tanh(h[:, :inter]) * h[:, inter:]) @ w_down.T


def moe(r, router_scale, w_router, per_expert_scale, pre_norm, gate_up, down, post_norm, *, eps: float,
        top_k: int, router_input_scale: float, decode: bool = False) -> np.ndarray:
    z = rms_norm(r, eps=eps) * router_scale * np.float32(router_input_scale)
    probs = softmax(z @ w_router.T)
    idx = topk(probs, k=top_k)
    w = np.take_along_axis(probs, idx, axis=-1)
    w = w / np.sum(w, axis=-1, keepdims=True) * per_expert_scale[idx]
    e_in = rms_norm(r, pre_norm, eps=eps)
    if decode:  # one token: gather only the k selected experts' weights
        sel_gu, sel_down = gate_up[idx[0]], down[idx[0]]  # [k, 2I, H], [k, H, I]
        h = np.einsum("kih,h->ki", sel_gu, e_in[0])
        inter = gate_up.shape[1] // 2
        h = gelu_tanh(h[:, :inter]) * h[:, inter:]
        out = (np.einsum("khi,ki->kh", sel_down, h) * w[0][:, None]).sum(axis=0, keepdims=True)
    else:
        out = moe_experts(e_in, idx, w, gate_up, down)
    return rms_norm(out, post_norm, eps=eps)


def ple_inputs(ids, x, table, w_proj, proj_norm, *, eps, table_scale, proj_scale, mix_scale, layers, dim):
    rows = np.asarray(table[np.asarray(ids, dtype=np.int64)], dtype=np.float32) * np.float32(table_scale)
    prj = (x @ w_proj.T) * np.float32(proj_scale)
    prj = rms_norm(prj.reshape(-1, layers, dim), proj_norm, eps=eps)
    return (prj + rows.reshape(-1, layers, dim)) * np.float32(mix_scale)


def ple_epilogue(x, ple, w_gate, w_proj, norm, *, eps, index) -> np.ndarray:
    gate = gelu_tanh(x @ w_gate.T) * ple[:, index]
    return x + rms_norm(gate @ w_proj.T, norm, eps=eps)


def lm_head(x, norm, w, *, eps, softcap) -> np.ndarray:
    logits = rms_norm(x, norm, eps=eps) @ w.T
    return logits if softcap is None else np.float32(softcap) * np.tanh(logits / np.float32(softcap))


# ---- audio tower ops (g4c.audio) ---------------------------------------------------------------
def conv2d(x: np.ndarray, w: np.ndarray, rows: np.ndarray, *, stride: int, padding: int) -> np.ndarray:
    """torch `Conv2d` (no bias, weights [Cout, Cin, kh, kw]) on channels-last x [T, F, Cin], summed
    tap by tap; `rows` only carries the output length (the IR has no symbolic arithmetic)."""
    t, f, _ = x.shape
    cout, _, kh, kw = w.shape
    t_out, f_out = (t + 2 * padding - kh) // stride + 1, (f + 2 * padding - kw) // stride + 1
    xp = np.pad(_f32(x), ((padding, padding), (padding, padding), (0, 0)))
    out = np.zeros((t_out, f_out, cout), np.float32)
    for i in range(kh):
        for j in range(kw):
            taps = xp[i: i + stride * (t_out - 1) + 1: stride, j: j + stride * (f_out - 1) + 1: stride]
            out += taps @ _f32(w[:, :, i, j]).T
    return out


def layer_norm(x: np.ndarray, w: np.ndarray, *, eps: float) -> np.ndarray:
    centred = _f32(x) - np.mean(_f32(x), axis=-1, keepdims=True)
    var = np.mean(centred * centred, axis=-1, keepdims=True)
    return centred * np.power(var + np.float32(eps), np.float32(-0.5)) * w


def sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(np.float32(0.0), -_f32(x)))  # no overflow for large |x|


def glu(x: np.ndarray) -> np.ndarray:
    a, b = np.split(_f32(x), 2, axis=-1)
    return a * sigmoid(b)


def depthwise_conv1d(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Causal depthwise conv (torch `Conv1d(groups=C)` after K-1 zero rows on the left)."""
    t, k = x.shape[0], w.shape[-1]
    xp = np.pad(_f32(x), ((k - 1, 0), (0, 0)))
    return np.sum([xp[j: j + t] * _f32(w[:, 0, j]) for j in range(k)], axis=0, dtype=np.float32)


def rel_positions(*, count: int, dim: int) -> np.ndarray:
    """`Gemma4AudioRelPositionalEncoding`: rows for the distances count-1 … 0; the timescales are
    fp32, as transformers builds them."""
    half = dim // 2
    inv = np.exp(np.arange(half, dtype=np.float32) * np.float32(-np.log(1e4) / max(half - 1, 1)))
    angle = np.arange(count - 1, -1, -1, dtype=np.float64)[:, None] * inv.astype(np.float64)
    return np.concatenate([np.sin(angle), np.cos(angle)], axis=-1).astype(np.float32)


def local_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, rel_k: np.ndarray, *, chunk: int,
                    context_left: int, context_right: int, softcap: float, invalid_logit: float) -> np.ndarray:
    """transformers' `Gemma4AudioAttention` core (after the projections and q/k scales) for one clip.

    Queries go in blocks of `chunk` rows (the last block padded); block b sees the `width = chunk +
    past + future` key rows from b·chunk - past on (`past = context_left - 1`, `future =
    context_right`; zero rows outside the clip). Logits `softcap·tanh((q·k + rel_shift(q·rel_k)) /
    softcap)`; a key s is visible to query t when it lies in the clip and d = t - s has 0 ≤ d < past or
    0 < -d < future (transformers' sliding-window mask, which leaves out the block's farthest past
    key); the others become `invalid_logit` (a row with no visible key averages all `width` rows)."""
    s, heads, dim = q.shape
    past, future = context_left - 1, context_right
    width = chunk + past + future
    blocks = -(-s // chunk)
    starts = np.arange(blocks)[:, None] * chunk
    query = starts + np.arange(chunk)  # [B, chunk]: the clip rows of each block's queries
    key = starts + np.arange(width) - past  # [B, width]: the clip rows of each block's keys
    qb = _pad_rows(_f32(q), 0, blocks * chunk - s)[query]
    kb, vb = (_pad_rows(_f32(a), past, future + chunk - 1)[key + past] for a in (k, v))
    logits = np.einsum("bihd,bjhd->hbij", qb, kb)
    logits += _rel_shift(np.einsum("bihd,rhd->hbir", qb, _f32(rel_k)), width)
    logits = np.float32(softcap) * np.tanh(logits / np.float32(softcap))
    dist = query[:, :, None] - key[:, None, :]
    inside = (key[:, None, :] >= 0) & (key[:, None, :] < s) & (query[:, :, None] < s)
    visible = inside & (((dist >= 0) & (dist < past)) | ((dist < 0) & (-dist < future)))
    probs = softmax(np.where(visible, logits, np.float32(invalid_logit)))
    out = np.einsum("hbij,bjhd->bihd", probs, vb)
    return out.reshape(blocks * chunk, heads, dim)[:s]


def _pad_rows(x: np.ndarray, before: int, after: int) -> np.ndarray:
    return np.pad(x, [(before, after)] + [(0, 0)] * (x.ndim - 1))


def _rel_shift(x: np.ndarray, width: int) -> np.ndarray:
    """transformers' `_rel_shift` of [..., chunk, R] → [..., chunk, width]: pad to width + 1 columns,
    flatten the block, keep chunk·width entries. Entry (i, j) is x[i, j - i] for j ≥ i (zero past R);
    entries j < i read the previous row, and are always masked."""
    *lead, rows, count = x.shape
    x = np.pad(x, [(0, 0)] * (len(lead) + 1) + [(0, width + 1 - count)])
    return x.reshape(*lead, rows * (width + 1))[..., : rows * width].reshape(*lead, rows, width)


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
    "rope_axial": rope_axial,
    "attention": attention,
    "pool_rows": lambda x, index: np.mean(_f32(x)[np.asarray(index, dtype=np.int64)], axis=1),
    "where_rows": lambda mask, a, b: np.where(np.asarray(mask)[:, None] != 0, _f32(a), _f32(b)),
    "softmax": softmax,
    "topk": topk,
    "take_along": lambda x, idx: np.take_along_axis(x, idx, axis=-1),
    "reduce_sum": lambda x: np.sum(_f32(x), axis=-1, keepdims=True),
    "moe_experts": moe_experts,
    "concat": lambda *xs, axis: np.concatenate(xs, axis=axis),
    "conv2d": conv2d,
    "layer_norm": layer_norm,
    "relu": lambda x: np.maximum(_f32(x), np.float32(0.0)),
    "silu": lambda x: _f32(x) * sigmoid(x),
    "softplus": lambda x: np.logaddexp(np.float32(0.0), _f32(x)),
    "clamp": lambda x, lo, hi: np.minimum(np.maximum(_f32(x), _f32(lo)), _f32(hi)),
    "clip": lambda x, limit: np.clip(_f32(x), np.float32(-limit), np.float32(limit)),
    "glu": glu,
    "depthwise_conv1d": depthwise_conv1d,
    "rel_positions": rel_positions,
    "local_attention": local_attention,
    "add_channels": lambda x, w: _f32(x) + _f32(w),
    "mul_channels": lambda x, w: _f32(x) * _f32(w),
    "encoder_attention": encoder_attention,
    "add_rms_norm": lambda residual, y, w, eps: residual + rms_norm(y, w, eps=eps),
    "gated_mlp": gated_mlp,
    "moe": moe,
    "ple_inputs": ple_inputs,
    "ple_epilogue": ple_epilogue,
    "lm_head": lm_head,
}
