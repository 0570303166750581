"""Lower an optimized g4c graph to a kernel program: TensorIR kernels plus the sequence of calls.

Each fused op becomes one or a few destination-passing kernels (`g4c.codegen.kernels`), deduplicated
by configuration across layers; the program lists, per step, the kernel and its buffer references.
`g4c.codegen.relax_module` turns each program into a Relax entry function; the programs also go into
the artifact manifest, for inspection and profiling.

Buffer references: `in:ids`, `in:positions` (runtime inputs), `w:NAME` (weights, including packed
ones such as `packed.l0_w_qkv`), `a:NAME` (activations, shapes in `Program.buffers`), `kv:SLOT`
(a KV cache buffer), and three non-kernel steps: `rows` (the PLE rows of the host-memory table,
gathered by the runtime), `last` (the last n rows) and `reshape`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from g4c.codegen import gpu_kernels as G
from g4c.codegen import kernels as K
from g4c.config import ModelConfig, RopeSpec
from g4c.ir import Graph, Node

Shape = list[int | str]


@dataclass
class Step:
    kernel: str  # kernel name, or a runtime builtin: "rows" | "last"
    args: list[str]  # inputs then outputs
    attrs: dict = field(default_factory=dict)


@dataclass
class Program:
    name: str
    steps: list[Step] = field(default_factory=list)
    buffers: dict[str, tuple[Shape, str]] = field(default_factory=dict)  # activation → (shape, dtype)
    outputs: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"name": self.name, "steps": [asdict(s) for s in self.steps],
                "buffers": {k: [list(v[0]), v[1]] for k, v in self.buffers.items()}, "outputs": self.outputs}


@dataclass
class KVSlot:
    slot: str
    layer: int
    kv_heads: int
    head_dim: int
    ring: bool
    window: int | None


@dataclass
class Lowered:
    kernels: dict[str, object]  # name → PrimFunc
    programs: dict[str, Program]
    recipes: dict[str, dict]  # derived weight name → how to make it (g4c.weights.derived_weight)
    kv_slots: dict[str, KVSlot]
    host_tables: list[str]
    weight_dtype: str = "float32"  # storage of GEMM/embedding/expert weights; the rest stays fp32
    half_weights: set[str] = field(default_factory=set)  # weights stored in weight_dtype
    gpu: bool = False  # GPU kernels (`g4c.codegen.gpu_kernels`) and int32 ids/positions
    max_binding: int | None = None  # GPU: bytes one storage binding may hold; bigger tables are split
    shared_memory: int = 16384  # GPU: shared memory per workgroup the kernels may use (WebGPU's default)
    tiled_gemm: bool = False  # GPU prefill linears as `gpu_kernels.linear_tiled` (targets without dlight's Matmul)

    @property
    def index_dtype(self) -> str:
        return "int32" if self.gpu else "int64"


class _Lowering:
    def __init__(self, cfg: ModelConfig, lowered: Lowered, program: Program):
        self.cfg, self.out, self.prog = cfg, lowered, program
        self.refs: dict[int, str] = {}
        self.k = G if lowered.gpu else K  # kernels that have a GPU form

    # -- helpers -----------------------------------------------------------------------------------
    def kernel(self, name: str, build: Callable[[], object]) -> str:
        """Register kernel `name` (built once); names are made C/WGSL identifiers (eps 1e-06 → 1e_06)."""
        symbol = re.sub(r"\W", "_", name)
        if symbol not in self.out.kernels:
            self.out.kernels[symbol] = build().with_attr("global_symbol", symbol)
        return symbol

    def buf(self, name: str, shape, dtype: str = "float32") -> str:
        self.prog.buffers[name] = (list(shape), dtype)
        return f"a:{name}"

    def call(self, kernel: str, *args: str, **attrs) -> None:
        self.prog.steps.append(Step(kernel, list(args), attrs))

    def ref(self, node: Node) -> str:
        return self.refs[id(node)]

    def weight(self, node: Node) -> str:
        if node.op == "param":
            return f"w:{node.attrs['name']}"
        if node.op == "concat":  # weights packed at compile time
            name = f"packed.{node.name}"
            parts = [i.attrs["name"] for i in node.inputs]
            axis = node.attrs["axis"]
            self.out.recipes.setdefault(name, {"concat": parts, "axis": axis})
            return f"w:{name}"
        raise NotImplementedError(f"weight operand %{node.name} is a {node.op}")

    def rope_table(self, spec: RopeSpec, head_dim: int) -> str:
        name = f"rope.{spec.rope_type}.{spec.theta:g}.{spec.partial_rotary_factor:g}.{head_dim}"
        self.out.recipes.setdefault(name, {"rope": [spec.rope_type, spec.theta, spec.partial_rotary_factor, head_dim]})
        return f"w:{name}"

    def stored(self, w: str) -> str:
        """Mark a matrix weight as stored in the artifact's weight dtype; returns that dtype."""
        self.out.half_weights.add(w[2:])
        return self.out.weight_dtype

    def linear(self, x: str, w: str, k: int, n: int, out_name: str, rows) -> str:
        dt = self.stored(w)
        gemv = self.out.gpu and self.prog.name == "decode"  # one token: a GEMV schedule, not a GEMM tile
        if self.out.tiled_gemm and not gemv:
            name = f"linear_tiled_{k}x{n}_{dt}"
            kern = self.kernel(name, lambda: G.linear_tiled(k, n, name, dt))
        else:
            name = f"{'gemv' if gemv else 'linear'}_{k}x{n}_{dt}"
            kern = self.kernel(name, lambda: K.linear(k, n, name, dt, rows=1 if gemv else None))
        out = self.buf(out_name, (rows, n))
        self.call(kern, x, w, out)
        return out

    def split_linear(self, x: str, w: str, k: int, n: int, out_name: str, rows) -> str:
        """`linear`, slice by slice when w is too big for one storage binding (the tied LM head)."""
        slices = self.row_slices(w, n, k)
        if not slices:
            return self.linear(x, w, k, n, out_name, rows)
        out = self.buf(out_name, (rows, n))
        for lo, hi, part in slices:
            piece = self.linear(x, part, k, hi - lo, f"{out_name}_{lo}", rows)
            name = f"place_columns_{lo}_{hi - lo}_{n}"
            self.call(self.kernel(name, lambda: G.place_columns(lo, hi - lo, n, name)), piece, out)
        return out

    def rms(self, x: str, w: str | None, dim: int, eps: float, out_name: str, rows) -> str:
        name = f"rms_norm_{dim}_{'w' if w else 'nw'}_{eps:g}"
        kern = self.kernel(name, lambda: K.rms_norm(dim, eps, w is not None, name))
        out = self.buf(out_name, (rows, dim))
        self.call(kern, *([x, w] if w else [x]), out)
        return out

    # -- ops ---------------------------------------------------------------------------------------
    def lower(self, graph: Graph) -> None:
        for node in graph.nodes:
            if node.op in ("param", "concat"):
                continue
            if node.op == "input":
                self.refs[id(node)] = f"in:{node.attrs['name']}"
                continue
            handler = getattr(self, f"op_{node.op}", None)
            if handler is None:
                raise NotImplementedError(f"no TVM lowering for op {node.op!r} (%{node.name}); run the passes first")
            self.refs[id(node)] = handler(node)
        self.prog.outputs = {k: self.ref(v) for k, v in graph.outputs.items()}

    def row_slices(self, w: str, rows: int, width: int) -> list[tuple[int, int, str]] | None:
        """[(lo, hi, weight ref)] slices of a [rows, width] table too big for one storage binding
        (None if it fits): the slices are weights of their own, cut at compile time."""
        limit, itemsize = self.out.max_binding, 2 if self.out.weight_dtype != "float32" else 4
        if not limit or rows * width * itemsize <= limit:
            return None
        step = max(64, limit // (width * itemsize) // 64 * 64)
        name, slices = w[2:], []
        for lo in range(0, rows, step):
            hi = min(rows, lo + step)
            part = f"{name}.rows{lo}-{hi}"
            self.out.recipes.setdefault(part, {"rows": [name, lo, hi]})
            self.stored(f"w:{part}")
            slices.append((lo, hi, f"w:{part}"))
        return slices

    def op_embedding(self, n: Node) -> str:
        table, ids = n.inputs
        vocab, hidden = table.type.shape
        w = self.weight(table)
        dt = self.stored(w)
        slices = self.row_slices(w, vocab, hidden)
        if slices:
            out = self.buf(n.name, n.type.shape)
            for lo, hi, part in slices:
                name = f"embed_rows_{lo}_{hi - lo}x{hidden}_{dt}"
                self.call(self.kernel(name, lambda: G.embed_rows(lo, hi - lo, hidden, name, dt)), part,
                          self.ref(ids), out)
            return out
        name = f"embed_{vocab}x{hidden}_{dt}"
        kern = self.kernel(name, lambda: K.embed(vocab, hidden, 1.0, name, dt))
        out = self.buf(n.name, n.type.shape)
        self.call(kern, w, self.ref(ids), out)
        return out

    def scale_rows(self, n: Node, x: Node, factor: str) -> str:
        """x * factor, with factor a 1-element weight (a constant or layer_scalar)."""
        dim = x.type.shape[1]
        kern = self.kernel(f"scale_rows_{dim}", lambda: K.scale_rows(dim, f"scale_rows_{dim}"))
        out = self.buf(n.name, n.type.shape)
        self.call(kern, self.ref(x), factor, out)
        return out

    def op_scale(self, n: Node) -> str:
        value = float(n.attrs["value"])
        self.out.recipes.setdefault(f"const.{value!r}", {"const": value})
        return self.scale_rows(n, n.inputs[0], f"w:const.{value!r}")

    def op_mul(self, n: Node) -> str:  # x * layer_scalar
        x, s = n.inputs
        if s.op != "param" or s.type.shape != (1,):
            raise NotImplementedError(f"mul %{n.name}: only `x * layer_scalar` is lowered")
        return self.scale_rows(n, x, self.weight(s))

    def op_add(self, n: Node) -> str:
        a, b = n.inputs
        dim = n.type.shape[1]
        kern = self.kernel(f"add_{dim}", lambda: K.add(dim, f"add_{dim}"))
        out = self.buf(n.name, n.type.shape)
        self.call(kern, self.ref(a), self.ref(b), out)
        return out

    def op_rms_norm(self, n: Node) -> str:
        x = n.inputs[0]
        w = self.weight(n.inputs[1]) if len(n.inputs) == 2 else None
        return self.rms(self.ref(x), w, x.type.shape[-1], n.attrs["eps"], n.name, x.type.shape[0])

    def op_add_rms_norm(self, n: Node) -> str:
        r, y, w = n.inputs
        dim = r.type.shape[1]
        name = f"add_rms_norm_{dim}_{n.attrs['eps']:g}"
        kern = self.kernel(name, lambda: K.add_rms_norm(dim, n.attrs["eps"], name))
        out = self.buf(n.name, n.type.shape)
        self.call(kern, self.ref(r), self.ref(y), self.weight(w), out)
        return out

    def op_take_last(self, n: Node) -> str:
        src = self.ref(n.inputs[0])
        # the source buffer's layout (e.g. PLE inputs are [T, L*P] here, [T, L, P] in the graph)
        trailing = self.prog.buffers[src[2:]][0][1:] if src.startswith("a:") else list(n.type.shape[1:])
        dtype = self.out.index_dtype if n.type.dtype == "int64" else n.type.dtype  # positions: the index dtype
        out = self.buf(n.name, [n.attrs["count"], *trailing], dtype)
        self.call("last", src, out, count=n.attrs["count"])
        return out

    def op_gated_mlp(self, n: Node) -> str:
        x, norm, w_gate_up, w_down = n.inputs
        rows, hidden = x.type.shape
        inter = w_gate_up.type.shape[0] // 2
        h = self.rms(self.ref(x), self.weight(norm), hidden, n.attrs["eps"], f"{n.name}_in", rows)
        gu = self.linear(h, self.weight(w_gate_up), hidden, 2 * inter, f"{n.name}_gate_up", rows)
        kern = self.kernel(f"gelu_mul_{inter}", lambda: K.gelu_mul(inter, f"gelu_mul_{inter}"))
        act = self.buf(f"{n.name}_act", (rows, inter))
        self.call(kern, gu, act)
        return self.linear(act, self.weight(w_down), inter, hidden, n.name, rows)

    def op_lm_head(self, n: Node) -> str:
        x, norm, w = n.inputs
        rows, hidden = x.type.shape
        vocab = w.type.shape[0]
        h = self.rms(self.ref(x), self.weight(norm), hidden, n.attrs["eps"], f"{n.name}_in", rows)
        cap = n.attrs["softcap"]
        logits = self.split_linear(h, self.weight(w), hidden, vocab, f"{n.name}_raw" if cap else n.name, rows)
        if cap is None:
            return logits
        name = f"softcap_{vocab}_{cap:g}"
        kern = self.kernel(name, lambda: K.softcap(vocab, cap, name))
        out = self.buf(n.name, n.type.shape)
        self.call(kern, logits, out)
        return out

    def op_fused_attention(self, n: Node) -> str:
        a = n.attrs
        x, positions, in_norm = n.inputs[:3]
        rows, hidden = x.type.shape
        nh, nkv, hd, eps = a["q_heads"], a["kv_heads"], a["head_dim"], a["eps"]
        spec = RopeSpec(a["rope_type"], a["theta"], a["partial_rotary_factor"])
        pos = self.ref(positions)
        h = self.rms(self.ref(x), self.weight(in_norm), hidden, eps, f"{n.name}_in", rows)
        inv_freq = self.rope_table(spec, hd)
        total = (nh + (nkv if a["k_eq_v"] else 2 * nkv)) * hd if a["role"] == "own" else nh * hd
        w_proj = self.weight(n.inputs[3])
        proj = self.linear(h, w_proj, hidden, total, f"{n.name}_proj", rows)
        q = self._heads(proj, pos, self.weight(n.inputs[4]), inv_freq, total, 0, nh, hd, eps, True, True,
                        f"{n.name}_q", rows)
        k_from_v = bool(a.get("k_from_v"))  # plan_kv_cache: store V only, rebuild K from it
        if a["role"] == "own":
            cached = []
            if not k_from_v:
                k = self._heads(proj, pos, self.weight(n.inputs[5]), inv_freq, total, nh, nkv, hd, eps, True, True,
                                f"{n.name}_k", rows)
                cached.append((a["k_slot"], k))
            v_offset = nh if a["k_eq_v"] else nh + nkv
            v = self._heads(proj, pos, None, None, total, v_offset, nkv, hd, eps, False, False, f"{n.name}_v", rows)
            cached.append((a["v_slot"], v))
            ring = a.get("cache") == "ring"
            for slot, new in cached:
                self.out.kv_slots[slot] = KVSlot(slot, a["layer"], nkv, hd, ring, a["window"])
                name = f"cache_write_{nkv}x{hd}"
                kern = self.kernel(name, lambda: self.k.cache_write(nkv, hd, name))
                self.call(kern, f"kv:{slot}", new, pos)
        window = a["window"]
        name = f"attention_{nh}x{nkv}x{hd}_w{window}{'_kfromv' if k_from_v else ''}"
        if self.out.gpu and self.prog.name != "decode":  # many queries: tiled over queries
            shared = self.out.shared_memory
            name = f"prefill_{name}_{G.prefill_chunk_keys(hd, shared)}"
            kern = self.kernel(name, lambda: G.prefill_attention(nh, nkv, hd, window, 1.0, name, k_from_v, shared))
        else:
            kern = self.kernel(name, lambda: self.k.attention(nh, nkv, hd, window, 1.0, name, k_from_v))
        attn = self.buf(f"{n.name}_attn", (rows, nh, hd))
        parts = None
        if self.out.gpu:  # split-K: the key ranges' partial softmaxes, merged by a second kernel
            parts = G.attention_parts(window)
            partial = self.buf(f"{n.name}_attn_parts", (rows, nh, parts, hd + 2))
        result = partial if parts else attn
        if k_from_v:  # the k_norm that rebuilds K: this layer's own, or its donor's (input 7 of a reuse node)
            k_norm = n.inputs[5] if a["role"] == "own" else n.inputs[7]
            self.call(kern, q, f"kv:{a['v_slot']}", pos, self.weight(k_norm), inv_freq, result)
        else:
            self.call(kern, q, f"kv:{a['k_slot']}", f"kv:{a['v_slot']}", pos, result)
        if parts:
            merge = f"attention_merge_{nh}x{hd}_{parts}"
            self.call(self.kernel(merge, lambda: G.attention_merge(nh, hd, parts, merge)), partial, attn)
        w_o = n.inputs[5] if a["role"] == "reuse" else n.inputs[6]
        flat = self.buf(f"{n.name}_attn_flat", (rows, nh * hd))
        self.call("reshape", attn, flat)
        return self.linear(flat, self.weight(w_o), nh * hd, hidden, n.name, rows)

    def _heads(self, proj, pos, w, inv_freq, total, offset, heads, hd, eps, weighted, rope, out_name, rows) -> str:
        name = f"heads_{total}_{offset}_{heads}x{hd}_{'w' if weighted else 'nw'}_{'rope' if rope else 'norope'}_{eps:g}"
        kern = self.kernel(name, lambda: self.k.head_norm_rope(total, offset, heads, hd, eps, weighted, rope, name))
        out = self.buf(out_name, (rows, heads, hd))
        args = [proj, pos] + ([w] if weighted else []) + ([inv_freq] if rope else [])
        self.call(kern, *args, out)
        return out

    def op_ple_inputs(self, n: Node) -> str:
        ids, x, table, w_proj, norm = n.inputs
        a = n.attrs
        rows_dim = x.type.shape[0]
        layers, dim = a["layers"], a["dim"]
        name = table.attrs["name"]
        if name not in self.out.host_tables:
            self.out.host_tables.append(name)
        gathered = self.buf(f"{n.name}_rows", (rows_dim, layers * dim))
        self.call("rows", self.ref(ids), gathered, table=name)
        proj = self.linear(self.ref(x), self.weight(w_proj), x.type.shape[1], layers * dim, f"{n.name}_proj", rows_dim)
        kname = f"ple_mix_{layers}x{dim}"
        kern = self.kernel(kname, lambda: K.ple_mix(layers, dim, a["eps"], a["table_scale"], a["proj_scale"],
                                                    a["mix_scale"], kname))
        out = self.buf(n.name, (rows_dim, layers * dim))
        self.call(kern, gathered, proj, self.weight(norm), out)
        return out

    def op_ple_epilogue(self, n: Node) -> str:
        x, ple, w_gate, w_proj, norm = n.inputs
        rows, hidden = x.type.shape
        layers, dim = self.cfg.num_hidden_layers, self.cfg.hidden_size_per_layer_input
        g = self.linear(self.ref(x), self.weight(w_gate), hidden, dim, f"{n.name}_gate", rows)
        index = n.attrs["index"]
        kname = f"ple_gate_{layers}x{dim}_{index}"
        kern = self.kernel(kname, lambda: K.ple_gate(layers, dim, index, kname))
        gated = self.buf(f"{n.name}_gated", (rows, dim))
        self.call(kern, g, self.ref(ple), gated)
        y = self.linear(gated, self.weight(w_proj), dim, hidden, f"{n.name}_proj", rows)
        name = f"add_rms_norm_{hidden}_{n.attrs['eps']:g}"
        kern = self.kernel(name, lambda: K.add_rms_norm(hidden, n.attrs["eps"], name))
        out = self.buf(n.name, (rows, hidden))
        self.call(kern, self.ref(x), y, self.weight(norm), out)
        return out

    def op_moe(self, n: Node) -> str:
        r, scale, w_router, pes, pre_norm, gate_up, down, post_norm = n.inputs
        a = n.attrs
        rows, hidden = r.type.shape
        experts, inter2, _ = gate_up.type.shape
        inter, top_k, eps = inter2 // 2, a["top_k"], a["eps"]
        kname = f"router_input_{hidden}"
        kern = self.kernel(kname, lambda: K.router_input(hidden, eps, a["router_input_scale"], kname))
        z = self.buf(f"{n.name}_router_in", (rows, hidden))
        self.call(kern, self.ref(r), self.weight(scale), z)
        logits = self.linear(z, self.weight(w_router), hidden, experts, f"{n.name}_router_logits", rows)
        kname = f"router_topk_{experts}_{top_k}"
        kern = self.kernel(kname, lambda: self.k.router_topk(experts, top_k, kname))
        idx = self.buf(f"{n.name}_idx", (rows, top_k), self.out.index_dtype)
        wts = self.buf(f"{n.name}_w", (rows, top_k))
        self.call(kern, logits, self.weight(pes), idx, wts)
        e_in = self.rms(self.ref(r), self.weight(pre_norm), hidden, eps, f"{n.name}_in", rows)
        w_gate_up, w_down = self.weight(gate_up), self.weight(down)
        dt = self.stored(w_gate_up)
        self.stored(w_down)
        e_out = self.buf(f"{n.name}_experts", (rows, hidden))
        shape = f"{hidden}x{inter}x{experts}_{top_k}_{dt}"
        if self.out.gpu and self.prog.name != "decode":  # many tokens: grouped by expert
            self.grouped_experts(n.name, e_in, idx, wts, (w_gate_up, w_down), e_out, rows,
                                 (hidden, inter, experts, top_k), dt)
        elif self.out.gpu:  # two kernels: the activations go through memory instead of float atomics
            act = self.buf(f"{n.name}_act", (rows, top_k, inter))
            gate_up_kernel = self.kernel(f"moe_gate_up_{shape}",
                                         lambda: G.moe_gate_up(hidden, inter, experts, top_k, f"moe_gate_up_{shape}", dt))
            self.call(gate_up_kernel, e_in, idx, wts, w_gate_up, act)
            down_kernel = self.kernel(f"moe_down_{shape}",
                                      lambda: G.moe_down(hidden, inter, experts, top_k, f"moe_down_{shape}", dt))
            self.call(down_kernel, act, idx, w_down, e_out)
        else:
            kern = self.kernel(f"moe_experts_{shape}",
                               lambda: K.moe_experts(hidden, inter, experts, top_k, f"moe_experts_{shape}", dt))
            self.call(kern, e_in, idx, wts, w_gate_up, w_down, e_out)
        return self.rms(e_out, self.weight(post_norm), hidden, eps, n.name, rows)

    def grouped_experts(self, name: str, x: str, idx: str, wts: str, weights: tuple[str, str], out: str, rows,
                        dims: tuple[int, int, int, int], dt: str) -> None:
        """GPU prefill MoE: `moe_align` sorts the routed (token, slot) entries into per-expert tiles,
        two grouped GEMMs run over the tiles (each weight row read once per tile of entries), and
        `moe_combine` sums each token's top-k outputs."""
        hidden, inter, experts, top_k = dims
        w_gate_up, w_down = weights
        align_name = f"moe_align_{experts}_{top_k}"
        align = self.kernel(align_name, lambda: G.moe_align(experts, top_k, align_name))
        tile_expert = self.buf(f"{name}_tile_expert", (rows, top_k), "int32")
        tile_entries = self.buf(f"{name}_tile_entries", (rows, top_k, G.MOE_TILE), "int32")
        self.call(align, idx, tile_expert, tile_entries)
        shape = f"{hidden}x{inter}x{experts}_{top_k}_{dt}"
        gate_up = self.kernel(f"moe_gate_up_grouped_{shape}", lambda: G.moe_gate_up_grouped(
            hidden, inter, experts, top_k, f"moe_gate_up_grouped_{shape}", dt))
        act = self.buf(f"{name}_act", (rows, top_k, inter))
        self.call(gate_up, x, wts, w_gate_up, tile_expert, tile_entries, act)
        down = self.kernel(f"moe_down_grouped_{shape}", lambda: G.moe_down_grouped(
            hidden, inter, experts, top_k, f"moe_down_grouped_{shape}", dt))
        parts = self.buf(f"{name}_parts", (rows, top_k, hidden))
        self.call(down, act, w_down, tile_expert, tile_entries, parts)
        combine = self.kernel(f"moe_combine_{hidden}_{top_k}", lambda: G.moe_combine(hidden, top_k,
                                                                                      f"moe_combine_{hidden}_{top_k}"))
        self.call(combine, parts, out)


def lower(cfg: ModelConfig, graphs: dict[str, Graph],
          weight_dtype: str = "float32", gpu: bool = False, max_binding: int | None = None,
          shared_memory: int = 16384, tiled_gemm: bool = False) -> Lowered:
    """Lower the optimized graphs (prefill, prefill_all, decode) into one kernel set and their programs;
    `gpu` picks the GPU kernels and int32 indices, `max_binding` splits tables bigger than that,
    `shared_memory` sizes the tiles of GPU prefill attention, `tiled_gemm` picks g4c's tiled GEMM for
    GPU prefill linears."""
    out = Lowered({}, {}, {}, {}, [], weight_dtype, gpu=gpu, max_binding=max_binding, shared_memory=shared_memory,
                  tiled_gemm=tiled_gemm)
    with K.index_dtype(out.index_dtype):
        for mode, graph in graphs.items():
            program = Program(mode)
            _Lowering(cfg, out, program).lower(graph)
            out.programs[mode] = program
    return out
