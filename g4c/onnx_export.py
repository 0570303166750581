"""ONNX: the Gemma 4 text decoder as a standard ONNX decoder, and the fused IR as an ONNX view.

`export_decoder` translates g4c's IR of the whole text model (the frontend's graph after the passes
that keep standard semantics: common-subexpression and dead-code elimination) into one ONNX graph for
prefill and decode, named as onnxruntime-genai / Hugging Face optimum exports are:

- inputs `input_ids`, `position_ids` int64 [batch, sequence_length] (absolute positions) and, for every
  layer that owns a KV cache, `past_key_values.<i>.key` / `.value` float32 [batch, kv_heads,
  past_sequence_length, head_dim];
- outputs `logits` float32 [batch, sequence_length, vocab] and `present.<i>.key` / `.value`, the past
  caches with the new positions appended (every layer's cache holds every position; the sliding
  window is a mask). KV-sharing layers read their donor's cache: the model's metadata
  (`g4c.kv_sources`) says which layer reads which.

Every IR op becomes standard ONNX ops with the IR's semantics (the reference interpreter's, which
match transformers): embedding → Gather, linear → MatMul, rms_norm → ReduceMean/Pow in fp32,
gelu_tanh → Gelu(approximate=tanh) (opset ≥ 20), rope → cos/sin of position × inv_freq (rotate-half,
both RoPE kinds, from the same `RopeSpec` frequencies), attention → opset-23 `Attention` with a boolean
mask of the causal window (GQA by its head counts; primitives below opset 23), the MoE experts →
every expert on every token weighted by a dense routing matrix (zeros outside the top-k: exact, E/k
times the FLOPs of a gathered MoE). IR values keep their layout with a leading batch axis; cached K/V
are kept as [batch, heads, positions, head_dim].

Weights are streamed into `model.onnx.data` (ONNX external data) one tensor at a time, so a model
larger than protobuf's 2 GB limit exports with the memory of its largest tensor. `--dtype fp16` stores
the matrices (linear, embedding and expert weights) as float16, cast to float32 where they are read;
norms, activations and caches stay float32.

`graph_view` writes the optimized, fused IR as an ONNX file for viewers such as Netron: one node per
IR op in the `g4c` domain (attributes as ONNX attributes, weights as typed graph inputs without
data); it is a picture, not a runnable model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from g4c.config import ModelConfig, RopeSpec
from g4c.errors import G4CError
from g4c.ir import Graph, Node

MIN_OPSET = 18  # ReduceMean with axes as an input
ATTENTION_OPSET = 23  # the Attention op
GELU_OPSET = 20  # the Gelu op
DEFAULT_OPSET = 23
DTYPES = ("fp32", "fp16")  # fp16: matrices stored as float16
DATA_FILE = "model.onnx.data"
ALIGNMENT = 64  # bytes: each tensor in the data file starts aligned (mmap-friendly)
HALF_OPS = {"linear": 1, "embedding": 0, "moe_experts": None}  # ops whose matrix inputs fp16 stores as float16
Progress = Callable[[str, int, int], None]


def check_opset(opset: int) -> int:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise G4CError(f"--opset {opset} is not supported: use {MIN_OPSET}..{newest} (this onnx package's newest)")
    return opset


def export_decoder(cfg: ModelConfig, weights, out_dir: Path, opset: int = DEFAULT_OPSET, dtype: str = "fp32",
                   overwrite: bool = False, progress: Progress | None = None) -> Path:
    """Write DIR/model.onnx and DIR/model.onnx.data (all or nothing); returns DIR/model.onnx."""
    import onnx

    from g4c.atomic import atomic_directory

    check_opset(opset)
    if dtype not in DTYPES:
        raise G4CError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    graph = standard_graph(cfg)
    with atomic_directory(Path(out_dir), overwrite) as tmp:
        with open(tmp / DATA_FILE, "wb") as data:
            emitter = _Emitter(opset, data, weights, _half_params(graph) if dtype == "fp16" else set())
            _Translator(emitter, cfg).run(graph, progress or (lambda *_: None))
        model = emitter.model(cfg, graph)
        onnx.save_model(model, str(tmp / "model.onnx"))
        onnx.checker.check_model(str(tmp / "model.onnx"), full_check=True)  # (by path: external data allowed)
    return Path(out_dir) / "model.onnx"


def standard_graph(cfg: ModelConfig) -> Graph:
    """The frontend's graph (every position's logits) after the passes that keep standard ops."""
    from g4c.frontend import build_graph
    from g4c.ir import verify
    from g4c.passes import PassContext, PassManager

    graph = build_graph(cfg, "prefill", logits_to_keep=None)
    verify(graph)
    return PassManager(["cse", "dce"]).run(graph, PassContext(cfg))


def _half_params(graph: Graph) -> set[str]:
    """Weights that fp16 stores as float16: the matrices of linear, embedding and the experts."""
    names = set()
    for node in graph:
        if node.op in HALF_OPS:
            index = HALF_OPS[node.op]
            for i, source in enumerate(node.inputs):
                if source.op == "param" and (index is None or i == index) and source.type.rank >= 2:
                    names.add(source.attrs["name"])
    return names


class _Emitter:
    """Collects ONNX nodes and initializers; weights go to the external data file as they come."""

    def __init__(self, opset: int, data, weights, half: set[str]):
        self.opset, self.data, self.weights, self.half = opset, data, weights, half
        self.nodes: list = []
        self.initializers: list = []
        self.inputs: list = []
        self.outputs: list = []
        self.names: set[str] = set()
        self.constants: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        name, n = hint, 1
        while name in self.names:
            name, n = f"{hint}_{n}", n + 1
        self.names.add(name)
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, outputs: int = 1, out: str | None = None,
           **attrs) -> str | list[str]:
        from onnx import helper

        names = [out or self.fresh(hint)] + [self.fresh(f"{hint}_{i}") for i in range(1, outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.fresh(f"{hint}/{op_type}"), **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value, dtype=np.float32, hint: str = "const") -> str:
        """A small constant initializer (deduplicated)."""
        from onnx import numpy_helper

        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.constants:
            name = self.fresh(hint)
            self.initializers.append(numpy_helper.from_array(array, name))
            self.constants[key] = name
        return self.constants[key]

    def weight(self, name: str, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> str:
        """A checkpoint tensor as an external-data initializer (float32, or float16 cast to float32 where read)."""
        from onnx import TensorProto, external_data_helper

        half = name in self.half
        array = np.asarray(self.weights.f32(name), dtype=np.float32)
        if transform is not None:
            array = transform(array)
        if half:
            with np.errstate(over="ignore"):
                array = np.ascontiguousarray(array, dtype=np.float16)
            if not np.isfinite(array).all():
                raise G4CError(f"--dtype fp16: weight {name} has values beyond float16's range (±65504): "
                               "export it as fp32")
        array = np.ascontiguousarray(array)
        stored = self.fresh(name + ("_fp16" if half else ""))
        offset = self.data.seek(0, 2)
        offset += -offset % ALIGNMENT
        self.data.seek(offset)
        self.data.write(memoryview(array).cast("B"))
        tensor = TensorProto(name=stored, data_type=TensorProto.FLOAT16 if half else TensorProto.FLOAT,
                             dims=list(array.shape))
        tensor.raw_data = b""  # (set_external_data wants the field present; the bytes are in the data file)
        external_data_helper.set_external_data(tensor, DATA_FILE, offset=offset, length=array.nbytes)
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        self.initializers.append(tensor)
        if half:
            return self.op("Cast", [stored], name, to=TensorProto.FLOAT)
        return stored

    def model(self, cfg: ModelConfig, graph: Graph):
        from onnx import helper

        onnx_graph = helper.make_graph(self.nodes, graph.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  producer_name="g4c", doc_string=f"Gemma 4 text decoder ({cfg.model_type}), "
                                  "exported by g4c export-onnx")
        model.ir_version = min(model.ir_version, 10)  # what current onnxruntime releases read
        helper.set_model_props(model, _metadata(cfg))
        return model


def _metadata(cfg: ModelConfig) -> dict[str, str]:
    owners = [s.index for s in cfg.layers if s.kv_mode != "reuse"]
    return {
        "g4c.model_type": cfg.model_type,
        "g4c.num_layers": str(cfg.num_hidden_layers),
        "g4c.cache_layers": json.dumps(owners),
        "g4c.kv_sources": json.dumps({str(s.index): s.kv_source for s in cfg.layers if s.kv_mode == "reuse"}),
        "g4c.sliding_window": json.dumps({str(s.index): s.window for s in cfg.layers}),
        "g4c.inputs": "input_ids, position_ids (absolute), past_key_values.<i>.key/.value [batch, kv_heads, "
                      "past_sequence_length, head_dim] for i in g4c.cache_layers; a layer in g4c.kv_sources "
                      "reads its donor's cache",
    }


@dataclass
class _Value:
    name: str
    batched: bool  # IR value with a leading batch axis (activations), else a weight/constant
    rank: int  # the IR rank (without the batch axis)


class _Translator:
    """IR nodes → ONNX nodes, one IR op at a time (see the module docstring for each op's translation)."""

    def __init__(self, emitter: _Emitter, cfg: ModelConfig):
        self.e, self.cfg = emitter, cfg
        self.values: dict[Node, _Value] = {}
        self.rope_tables: dict[tuple, tuple[str, str]] = {}
        self.masks: dict[int | None, str] = {}
        self.transposed: dict[str, str] = {}  # weight → its Transpose (weights not stored transposed)
        self.stored_t: set[Node] = set()  # params stored [K, N]

    def run(self, graph: Graph, progress: Progress) -> None:
        from onnx import TensorProto, helper

        uses, weights, written = graph.use_def(), len(graph.params), 0
        for node in graph.nodes:
            self.values[node] = self._translate(node, uses[node])
            if node.op == "param":
                written += 1
                progress("writing weights", written, weights)
        logits = self.values[graph.outputs["logits"]]
        self.e.op("Identity", [logits.name], "logits", out="logits")
        self.e.outputs.insert(0, helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["batch_size", "sequence_length", self.cfg.vocab_size]))

    # ---- per op ------------------------------------------------------------------------------------
    def _translate(self, node: Node, users: list[Node]) -> _Value:
        handler = getattr(self, f"_op_{node.op}", None)
        if handler is None:
            raise G4CError(f"ONNX export: the IR op {node.op!r} has no translation")
        if node.op == "param":
            return handler(node, users)
        return handler(node, *[self.values[i] for i in node.inputs])

    def _op_input(self, node: Node) -> _Value:
        from onnx import TensorProto, helper

        name = {"ids": "input_ids", "positions": "position_ids"}[node.attrs["name"]]
        self.e.names.add(name)
        self.e.inputs.append(helper.make_tensor_value_info(name, TensorProto.INT64, ["batch_size", "sequence_length"]))
        return _Value(name, True, 1)

    def _op_param(self, node: Node, users: list[Node]) -> _Value:
        name = node.attrs["name"]
        if users and all(u.op == "linear" and u.inputs[1] is node for u in users):
            self.stored_t.add(node)
            return _Value(self.e.weight(name, lambda w: w.T), False, 2)  # stored [K, N]: MatMul reads it as is
        if users and all(u.op == "moe_experts" for u in users):  # [E, N, K] → [E, K, N]
            return _Value(self.e.weight(name, lambda w: w.transpose(0, 2, 1)), False, 3)
        return _Value(self.e.weight(name), False, node.type.rank)

    def _op_embedding(self, node: Node, table: _Value, ids: _Value) -> _Value:
        return _Value(self.e.op("Gather", [table.name, ids.name], node.name, axis=0), ids.batched,
                      ids.rank + table.rank - 1)

    def _op_linear(self, node: Node, x: _Value, w: _Value) -> _Value:
        w_t = self._weight_t(node.inputs[1], w)
        return _Value(self.e.op("MatMul", [x.name, w_t], node.name), x.batched, x.rank)

    def _weight_t(self, param: Node, w: _Value) -> str:
        """[K, N] for MatMul: params only read by linears are stored so; others (a tied embedding) get a
        Transpose (constant-folded by runtimes)."""
        if param in self.stored_t:
            return w.name
        if w.name not in self.transposed:
            self.transposed[w.name] = self.e.op("Transpose", [w.name], f"{w.name}_t", perm=[1, 0])
        return self.transposed[w.name]

    def _binary(self, op_type: str, node: Node, a: _Value, b: _Value) -> _Value:
        names = [a.name, b.name]
        if a.batched and b.batched and a.rank != b.rank:  # align the IR axes after the batch axis
            low = 0 if a.rank < b.rank else 1
            missing = abs(a.rank - b.rank)
            names[low] = self.e.op("Unsqueeze", [names[low], self.e.const(list(range(1, 1 + missing)), np.int64)],
                                   f"{node.name}_align")
        return _Value(self.e.op(op_type, names, node.name), a.batched or b.batched, max(a.rank, b.rank))

    def _op_add(self, node, a, b):
        return self._binary("Add", node, a, b)

    def _op_mul(self, node, a, b):
        return self._binary("Mul", node, a, b)

    def _op_div(self, node, a, b):
        return self._binary("Div", node, a, b)

    def _op_scale(self, node: Node, x: _Value) -> _Value:
        return _Value(self.e.op("Mul", [x.name, self.e.const(node.attrs["value"])], node.name), x.batched, x.rank)

    def _op_rms_norm(self, node: Node, x: _Value, w: _Value | None = None) -> _Value:
        e = self.e
        square = e.op("Mul", [x.name, x.name], f"{node.name}_sq")
        mean = e.op("ReduceMean", [square, e.const([-1], np.int64)], f"{node.name}_mean", keepdims=1)
        inv = e.op("Pow", [e.op("Add", [mean, e.const(node.attrs["eps"])], f"{node.name}_eps"), e.const(-0.5)],
                   f"{node.name}_inv")
        out = e.op("Mul", [x.name, inv], node.name if w is None else f"{node.name}_unit")
        if w is not None:
            out = e.op("Mul", [out, w.name], node.name)
        return _Value(out, x.batched, x.rank)

    def _op_gelu_tanh(self, node: Node, x: _Value) -> _Value:
        return _Value(self._gelu(x.name, node.name), x.batched, x.rank)

    def _gelu(self, x: str, hint: str) -> str:
        e = self.e
        if e.opset >= GELU_OPSET:
            return e.op("Gelu", [x], hint, approximate="tanh")
        cube = e.op("Mul", [e.op("Mul", [x, x], f"{hint}_x2"), x], f"{hint}_x3")
        inner = e.op("Add", [x, e.op("Mul", [cube, e.const(0.044715)], f"{hint}_c3")], f"{hint}_in")
        t = e.op("Tanh", [e.op("Mul", [inner, e.const(np.sqrt(2.0 / np.pi))], f"{hint}_s")], f"{hint}_tanh")
        half_x = e.op("Mul", [x, e.const(0.5)], f"{hint}_half")
        return e.op("Mul", [half_x, e.op("Add", [t, e.const(1.0)], f"{hint}_1p")], hint)

    def _op_softcap(self, node: Node, x: _Value) -> _Value:
        e, cap = self.e, node.attrs["cap"]
        t = e.op("Tanh", [e.op("Div", [x.name, e.const(cap)], f"{node.name}_div")], f"{node.name}_tanh")
        return _Value(e.op("Mul", [t, e.const(cap)], node.name), x.batched, x.rank)

    def _op_reshape(self, node: Node, x: _Value) -> _Value:
        dims = [d if isinstance(d, int) else -1 for d in node.attrs["shape"]]
        if dims.count(-1) > 1:
            raise G4CError(f"ONNX export: reshape {node.name} has two symbolic dims {node.attrs['shape']}")
        shape = [0, *dims] if x.batched else dims  # 0: keep the batch axis
        return _Value(self.e.op("Reshape", [x.name, self.e.const(shape, np.int64)], node.name), x.batched,
                      len(dims))

    def _op_select(self, node: Node, x: _Value) -> _Value:
        axis = node.attrs["axis"] + (1 if x.batched else 0)
        index = self.e.const(node.attrs["index"], np.int64)
        return _Value(self.e.op("Gather", [x.name, index], node.name, axis=axis), x.batched, x.rank - 1)

    def _op_rope(self, node: Node, x: _Value, positions: _Value) -> _Value:
        e, head_dim = self.e, node.type.shape[-1]
        cos, sin = self._rope_table(node, positions, head_dim)
        half = head_dim // 2
        first = e.op("Slice", [x.name, e.const([0], np.int64), e.const([half], np.int64), e.const([-1], np.int64)],
                     f"{node.name}_lo")
        second = e.op("Slice", [x.name, e.const([half], np.int64), e.const([head_dim], np.int64),
                                e.const([-1], np.int64)], f"{node.name}_hi")
        rotated = e.op("Concat", [e.op("Neg", [second], f"{node.name}_neg"), first], f"{node.name}_rot", axis=-1)
        out = e.op("Add", [e.op("Mul", [x.name, cos], f"{node.name}_cos"),
                           e.op("Mul", [rotated, sin], f"{node.name}_sin")], node.name)
        return _Value(out, x.batched, x.rank)

    def _rope_table(self, node: Node, positions: _Value, head_dim: int) -> tuple[str, str]:
        """cos/sin [B, T, 1, D] of positions × inv_freq (as the reference computes them), once per RoPE kind."""
        key = (node.attrs["rope_type"], node.attrs["theta"], node.attrs["partial_rotary_factor"], head_dim)
        if key not in self.rope_tables:
            from onnx import TensorProto

            e = self.e
            inv_freq = RopeSpec(*key[:3]).inv_freq(head_dim).astype(np.float32)
            hint = f"rope_{key[0]}_{head_dim}"
            pos = e.op("Unsqueeze", [e.op("Cast", [positions.name], f"{hint}_pos", to=TensorProto.FLOAT),
                                     e.const([-1], np.int64)], f"{hint}_pos3")
            freqs = e.op("Mul", [pos, e.const(inv_freq, hint=f"{hint}_inv_freq")], f"{hint}_freqs")
            emb = e.op("Unsqueeze", [e.op("Concat", [freqs, freqs], f"{hint}_emb", axis=-1),
                                     e.const([2], np.int64)], f"{hint}_emb4")
            self.rope_tables[key] = (e.op("Cos", [emb], f"{hint}_cos"), e.op("Sin", [emb], f"{hint}_sin"))
        return self.rope_tables[key]

    def _op_kv_cache(self, node: Node, x: _Value) -> _Value:
        """past [B, H, P, D] ++ the new rows [B, T, H, D] → present [B, H, P+T, D] (an output)."""
        from onnx import TensorProto, helper

        e = self.e
        layer, part = node.attrs["slot"].removeprefix("layers.").split(".")
        part = {"k": "key", "v": "value"}[part]
        _, heads, head_dim = node.type.shape
        past, present = f"past_key_values.{layer}.{part}", f"present.{layer}.{part}"
        e.names.update((past, present))
        e.inputs.append(helper.make_tensor_value_info(past, TensorProto.FLOAT,
                                                      ["batch_size", heads, "past_sequence_length", head_dim]))
        e.outputs.append(helper.make_tensor_value_info(present, TensorProto.FLOAT,
                                                       ["batch_size", heads, "total_sequence_length", head_dim]))
        new = e.op("Transpose", [x.name], f"{node.name}_bhtd", perm=[0, 2, 1, 3])
        e.op("Concat", [past, new], node.name, out=present, axis=2)
        return _Value(present, True, 3)

    def _op_attention(self, node: Node, q: _Value, k: _Value, v: _Value, positions: _Value) -> _Value:
        e = self.e
        q_heads, kv_heads = node.inputs[0].type.shape[1], node.inputs[1].type.shape[1]
        qh = e.op("Transpose", [q.name], f"{node.name}_q", perm=[0, 2, 1, 3])  # [B, Hq, T, D]
        mask = self._mask(node.attrs["window"], positions, k)
        scaling = float(node.attrs["scaling"])
        if e.opset >= ATTENTION_OPSET:
            out = e.op("Attention", [qh, k.name, v.name, mask], f"{node.name}_bhtd", scale=scaling)
        else:
            out = self._attention_primitives(node.name, qh, k.name, v.name, mask, scaling, q_heads, kv_heads)
        return _Value(e.op("Transpose", [out], node.name, perm=[0, 2, 1, 3]), True, 3)

    def _mask(self, window: int | None, positions: _Value, k: _Value) -> str:
        """[B, 1, T, S] booleans: key j (at position j) is visible from a query at position p when
        j ≤ p and p − j < window."""
        if window not in self.masks:
            e = self.e
            hint = f"mask_{window or 'full'}"
            length = e.op("Gather", [e.op("Shape", [k.name], f"{hint}_shape"), e.const(2, np.int64)], f"{hint}_s")
            keys = e.op("Range", [e.const(0, np.int64), length, e.const(1, np.int64)], f"{hint}_keys")  # [S]
            query = e.op("Unsqueeze", [positions.name, e.const([1, 3], np.int64)], f"{hint}_q")  # [B, 1, T, 1]
            visible = e.op("LessOrEqual", [keys, query], f"{hint}_causal")
            if window is not None:
                inside = e.op("Less", [e.op("Sub", [query, keys], f"{hint}_dist"), e.const(window, np.int64)],
                              f"{hint}_inside")
                visible = e.op("And", [visible, inside], hint)
            self.masks[window] = visible
        return self.masks[window]

    def _attention_primitives(self, hint: str, q: str, k: str, v: str, mask: str, scaling: float, q_heads: int,
                              kv_heads: int) -> str:
        e = self.e
        if q_heads > kv_heads:  # GQA: query head h reads KV head h // (q_heads // kv_heads)
            k, v = (self._repeat_heads(x, q_heads, kv_heads, f"{hint}_{x_name}") for x, x_name in ((k, "k"), (v, "v")))
        scores = e.op("MatMul", [q, e.op("Transpose", [k], f"{hint}_kt", perm=[0, 1, 3, 2])], f"{hint}_scores")
        scores = e.op("Mul", [scores, e.const(scaling)], f"{hint}_scaled")
        scores = e.op("Where", [mask, scores, e.const(-np.inf)], f"{hint}_masked")
        return e.op("MatMul", [e.op("Softmax", [scores], f"{hint}_probs", axis=-1), v], f"{hint}_bhtd")

    def _repeat_heads(self, x: str, q_heads: int, kv_heads: int, hint: str) -> str:
        """[B, Hk, S, D] → [B, Hq, S, D], each KV head repeated for its group of query heads."""
        e = self.e
        shape = e.op("Shape", [x], f"{hint}_shape")  # [B, Hk, S, D]
        b_h = e.op("Slice", [shape, e.const([0], np.int64), e.const([2], np.int64)], f"{hint}_bh")
        s_d = e.op("Slice", [shape, e.const([2], np.int64), e.const([4], np.int64)], f"{hint}_sd")
        to = e.op("Concat", [b_h, e.const([q_heads // kv_heads], np.int64), s_d], f"{hint}_to", axis=0)
        expanded = e.op("Expand", [e.op("Unsqueeze", [x, e.const([2], np.int64)], f"{hint}_u"), to], f"{hint}_x")
        head_dim = e.op("Slice", [shape, e.const([3], np.int64), e.const([4], np.int64)], f"{hint}_d")
        flat = e.op("Concat", [e.const([0, q_heads, -1], np.int64), head_dim], f"{hint}_flat", axis=0)
        return e.op("Reshape", [expanded, flat], f"{hint}_rep")

    def _op_softmax(self, node: Node, x: _Value) -> _Value:
        return _Value(self.e.op("Softmax", [x.name], node.name, axis=-1), x.batched, x.rank)

    def _op_topk(self, node: Node, x: _Value) -> _Value:
        _, indices = self.e.op("TopK", [x.name, self.e.const([node.attrs["k"]], np.int64)], node.name, outputs=2,
                               axis=-1, largest=1, sorted=1)
        return _Value(indices, x.batched, x.rank)

    def _op_take_along(self, node: Node, x: _Value, idx: _Value) -> _Value:
        return _Value(self.e.op("GatherElements", [x.name, idx.name], node.name, axis=-1), x.batched, x.rank)

    def _op_reduce_sum(self, node: Node, x: _Value) -> _Value:
        return _Value(self.e.op("ReduceSum", [x.name, self.e.const([-1], np.int64)], node.name, keepdims=1),
                      x.batched, x.rank)

    def _op_concat(self, node: Node, *xs: _Value) -> _Value:
        axis = node.attrs["axis"] + (1 if xs[0].batched else 0)
        return _Value(self.e.op("Concat", [x.name for x in xs], node.name, axis=axis), xs[0].batched, xs[0].rank)

    def _op_moe_experts(self, node: Node, x: _Value, idx: _Value, w: _Value, gate_up: _Value,
                        down: _Value) -> _Value:
        """Every expert on every token, weighted by the dense routing matrix (zero outside the top-k)."""
        e, hint = self.e, node.name
        experts, two_inter, _ = node.inputs[3].type.shape
        inter = two_inter // 2
        h = e.op("MatMul", [e.op("Unsqueeze", [x.name, e.const([2, 3], np.int64)], f"{hint}_x"), gate_up.name],
                 f"{hint}_gate_up")  # [B, T, 1, 1, H] @ [E, H, 2I] → [B, T, E, 1, 2I]
        gate = e.op("Slice", [h, e.const([0], np.int64), e.const([inter], np.int64), e.const([-1], np.int64)],
                    f"{hint}_gate")
        up = e.op("Slice", [h, e.const([inter], np.int64), e.const([two_inter], np.int64), e.const([-1], np.int64)],
                  f"{hint}_up")
        act = e.op("Mul", [self._gelu(gate, f"{hint}_act"), up], f"{hint}_glu")
        y = e.op("Squeeze", [e.op("MatMul", [act, down.name], f"{hint}_down"), e.const([3], np.int64)],
                 f"{hint}_y")  # [B, T, E, 1, I] @ [E, I, H] → [B, T, E, H]
        zeros_shape = e.op("Concat", [e.op("Shape", [idx.name], f"{hint}_idx_shape", end=-1),
                                      e.const([experts], np.int64)], f"{hint}_dense_shape", axis=0)
        zeros = e.op("ConstantOfShape", [zeros_shape], f"{hint}_zeros")
        dense = e.op("ScatterElements", [zeros, idx.name, w.name], f"{hint}_routing", axis=-1)  # [B, T, E]
        weighted = e.op("Mul", [y, e.op("Unsqueeze", [dense, e.const([-1], np.int64)], f"{hint}_w4")],
                        f"{hint}_weighted")
        return _Value(e.op("ReduceSum", [weighted, e.const([2], np.int64)], hint, keepdims=0), True, 2)


# ---- the fused IR as a picture --------------------------------------------------------------------
def graph_view(graph: Graph, path: Path) -> int:
    """Write the IR as an ONNX model of `g4c`-domain nodes (for Netron); returns the number of op nodes."""
    import onnx
    from onnx import TensorProto, helper

    from g4c.atomic import atomic_file

    element = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64, "int32": TensorProto.INT32,
               "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
    dtypes = lambda node: element.get(node.type.dtype, TensorProto.FLOAT)  # noqa: E731
    dims = lambda node: [d if isinstance(d, int) else str(d) for d in node.type.shape]  # noqa: E731
    inputs = [helper.make_tensor_value_info(n.name, dtypes(n), dims(n)) for n in graph if n.op in ("input", "param")]
    nodes = [helper.make_node(n.op, [i.name for i in n.inputs], [n.name], name=n.name, domain="g4c",
                              **{k: _attribute(v) for k, v in n.attrs.items() if v is not None})
             for n in graph if n.op not in ("input", "param")]
    value_info = [helper.make_tensor_value_info(n.name, dtypes(n), dims(n)) for n in graph
                  if n.op not in ("input", "param") and n not in graph.outputs.values()]
    outputs = [helper.make_tensor_value_info(n.name, dtypes(n), dims(n)) for n in graph.outputs.values()]
    model = helper.make_model(helper.make_graph(nodes, graph.name, inputs, outputs, value_info=value_info),
                              opset_imports=[helper.make_opsetid("", DEFAULT_OPSET), helper.make_opsetid("g4c", 1)],
                              producer_name="g4c", doc_string="g4c IR after its passes (a view: not runnable)")
    with atomic_file(Path(path)) as tmp:
        onnx.save_model(model, str(tmp))
    return len(nodes)


def _attribute(value):
    """An IR attribute as an ONNX attribute value (ints, floats, strings; anything else as JSON)."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    return json.dumps(value, default=str)
