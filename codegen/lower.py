"""Lower an optimized g4c graph to programs of kernel requests (`KernelSpec`) and buffer references.

Each fused op becomes one or a few destination-passing kernel calls, deduplicated by spec across
layers; the program lists, per step, the kernel and its buffer references (`g4c.artifact.Program`
documents them). How the programs are structured (split-K attention, grouped MoE, one-row decode
linears, split tables) follows the target's `LoweringOptions`; which TensorIR builds and schedules
each spec is the target's business. `g4c.codegen.relax_module` turns each program into a Relax entry
function; the programs also go into the artifact manifest, for inspection and profiling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from g4c.artifact import KVSlot, Program, Step, source_tensors
from g4c.quant import BITS, GROUP, SCHEMES
from g4c.codegen.gpu_kernels import GEMM_TILE, attention_parts
from g4c.codegen.lower_audio import AudioLowering
from g4c.codegen.spec import KernelSpec, LoweringOptions
from g4c.config import ModelConfig, RopeSpec
from g4c.ir import Graph, Node


@dataclass
class Lowered:
    kernels: dict[str, KernelSpec]  # kernel name → spec (the target builds and schedules it)
    programs: dict[str, Program]
    recipes: dict[str, dict]  # derived weight name → how to make it (g4c.artifact.recipes)
    kv_slots: dict[str, KVSlot]
    host_tables: list[str]
    options: LoweringOptions
    weight_dtype: str = "float32"  # storage of GEMM/embedding/expert weights; the rest stays fp32
    weight_dtype_tensors: set[str] = field(default_factory=set)  # weights stored in weight_dtype
    quant: str | None = None  # group quantization of linear and embedding matrices, expert banks (g4c.quant)
    host_quant: str | None = None  # ... of the host tables (the PLE table)
    stored_scheme: Callable[[str], str | None] | None = field(default=None, repr=False)  # checkpoint's own blocks

    @property
    def index_dtype(self) -> str:
        return self.options.index_dtype


class _Lowering(AudioLowering):
    def __init__(self, cfg: ModelConfig, lowered: Lowered, program: Program):
        self.cfg, self.out, self.prog = cfg, lowered, program
        self.opt = lowered.options
        self.decode = program.name == "decode"  # one token per call
        self.refs: dict[int, str] = {}

    # -- helpers -----------------------------------------------------------------------------------
    def kernel(self, op: str, **params) -> str:
        """Request a kernel (deduplicated by spec across layers and programs); returns its name."""
        spec = KernelSpec.of(op, **params)
        self.out.kernels.setdefault(spec.name, spec)
        return spec.name

    def buf(self, name: str, shape, dtype: str = "float32") -> str:
        self.prog.buffers[name] = (list(shape), dtype)
        return f"a:{name}"

    def call(self, kernel: str, *args: str, **attrs) -> None:
        self.prog.steps.append(Step(kernel, list(args), attrs))

    def ref(self, node: Node) -> str:
        return self.refs[id(node)]

    @staticmethod
    def is_weight(node: Node) -> bool:
        """A weight operand: a param, or one made from params at compile time (packed, a table slice)."""
        return node.op in ("param", "concat") or (node.op == "select" and node.inputs[0].op == "param")

    def weight(self, node: Node) -> str:
        if node.op == "param":
            return f"w:{node.attrs['name']}"
        if node.op == "concat":  # weights packed at compile time
            name = f"packed.{node.name}"
            parts = [i.attrs["name"] for i in node.inputs]
            axis = node.attrs["axis"]
            self.out.recipes.setdefault(name, {"concat": parts, "axis": axis})
            return f"w:{name}"
        if node.op == "select" and node.inputs[0].op == "param":  # a slice of a stacked table
            source, axis, index = node.inputs[0].attrs["name"], node.attrs["axis"], node.attrs["index"]
            name = f"{source}.{axis}_{index}"
            self.out.recipes.setdefault(name, {"select": [source, axis, index]})
            return f"w:{name}"
        raise NotImplementedError(f"weight operand %{node.name} is a {node.op}")

    def rope_table(self, spec: RopeSpec, head_dim: int) -> str:
        name = f"rope.{spec.rope_type}.{spec.theta:g}.{spec.partial_rotary_factor:g}.{head_dim}"
        self.out.recipes.setdefault(name, {"rope": [spec.rope_type, spec.theta, spec.partial_rotary_factor, head_dim]})
        return f"w:{name}"

    def stored(self, w: str) -> str:
        """Mark a matrix weight as stored in the artifact's weight dtype; returns that dtype."""
        self.out.weight_dtype_tensors.add(w[2:])
        return self.out.weight_dtype

    def matrix(self, w: str, k: int) -> tuple[list[str], str | None]:
        """The kernel arguments of a [..., k] matrix weight (a linear or embedding matrix, an expert bank
        [E, N, k]) and its quantization: (data, scales) made at compile time when --quant applies (k a
        multiple of the group), else the weight itself, stored in the weight dtype."""
        scheme = self.scheme_for(w[2:])
        if scheme is None or k % GROUP:
            self.stored(w)
            return [w], None
        name = w[2:]
        parts = [f"{name}.{scheme}", f"{name}.{scheme}_scales"]
        for part, kind in zip(parts, ("data", "scales")):
            stored = self.opt.quant_word if kind == "data" else self.opt.quant_scale
            self.out.recipes.setdefault(part, {"quant": [name, scheme, kind, stored]})
        return [f"w:{p}" for p in parts], scheme

    def scheme_for(self, name: str) -> str | None:
        """The checkpoint's own scheme when every source tensor of this weight is stored quantized in
        it (a GGUF file's Q4_0/Q8_0 blocks: compiled as they are), else --quant's."""
        if self.out.stored_scheme is not None:
            stored = {self.out.stored_scheme(leaf) for leaf in source_tensors(name, self.out.recipes)}
            if len(stored) == 1 and None not in stored:
                return stored.pop()
        return self.out.quant

    def linear(self, x: str, w: str, k: int, n: int, out_name: str, rows) -> str:
        args, scheme = self.matrix(w, k)
        gemv = self.opt.decode_gemv and self.decode  # one token: a GEMV schedule, not a GEMM tile
        if scheme:  # one decode row: a GEMV that dequantizes inside the reduction, not a prefill tile
            op = "linear_qdot" if self.opt.int8_dot else "linear_q"
            kern = self.kernel(op, k=k, n=n, scheme=scheme, rows=1 if self.decode else None)
        elif self.opt.tiled_gemm and not gemv:
            kern = self.kernel("linear_tiled", k=k, n=n, dtype=self.out.weight_dtype)
        else:
            kern = self.kernel("linear", k=k, n=n, dtype=self.out.weight_dtype, rows=1 if gemv else None)
        out = self.buf(out_name, (rows, n))
        self.call(kern, x, *args, out)
        return out

    def split_linear(self, x: str, w: str, k: int, n: int, out_name: str, rows) -> str:
        """`linear`, slice by slice when w is too big for one storage binding (the tied LM head)."""
        slices = self.row_slices(w, n, k)
        if not slices:
            return self.linear(x, w, k, n, out_name, rows)
        out = self.buf(out_name, (rows, n))
        for lo, hi, part in slices:
            piece = self.linear(x, part, k, hi - lo, f"{out_name}_{lo}", rows)
            self.call(self.kernel("place_columns", lo=lo, width=hi - lo, total=n), piece, out)
        return out

    def rms(self, x: str, w: str | None, dim: int, eps: float, out_name: str, rows) -> str:
        kern = self.kernel("rms_norm", dim=dim, eps=eps, weighted=w is not None)
        out = self.buf(out_name, (rows, dim))
        self.call(kern, *([x, w] if w else [x]), out)
        return out

    # -- ops ---------------------------------------------------------------------------------------
    def lower(self, graph: Graph) -> None:
        for node in graph.nodes:
            if self.is_weight(node):
                continue  # made at compile time (`weight`)
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
        limit = self.opt.max_binding
        if self.out.quant and width % GROUP == 0:
            row_bytes = width * BITS[self.out.quant] // 8  # the data bytes; the scales are smaller
        else:
            row_bytes = width * (2 if self.out.weight_dtype != "float32" else 4)
        if not limit or rows * row_bytes <= limit:
            return None
        step = max(64, limit // row_bytes // 64 * 64)
        name, slices = w[2:], []
        for lo in range(0, rows, step):
            hi = min(rows, lo + step)
            part = f"{name}.rows{lo}-{hi}"
            self.out.recipes.setdefault(part, {"rows": [name, lo, hi]})
            slices.append((lo, hi, f"w:{part}"))
        return slices

    def op_embedding(self, n: Node) -> str:
        table, ids = n.inputs
        vocab, hidden = table.type.shape
        w = self.weight(table)
        out = self.buf(n.name, n.type.shape)
        slices = self.row_slices(w, vocab, hidden)
        for lo, hi, part in slices or [(0, vocab, w)]:
            args, scheme = self.matrix(part, hidden)
            if slices:
                kern = self.kernel("embed_rows", lo=lo, rows=hi - lo, hidden=hidden,
                                   storage=scheme or self.out.weight_dtype)
            elif scheme:
                kern = self.kernel("embed_q", vocab=vocab, hidden=hidden, scheme=scheme)
            else:
                kern = self.kernel("embed", vocab=vocab, hidden=hidden, dtype=self.out.weight_dtype)
            self.call(kern, *args, self.ref(ids), out)
        return out

    def scale_rows(self, n: Node, x: Node, factor: str) -> str:
        """x * factor, with factor a 1-element weight (a constant or layer_scalar)."""
        dim = x.type.shape[1]
        kern = self.kernel("scale_rows", dim=dim)
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
        kern = self.kernel("add", dim=dim)
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
        kern = self.kernel("add_rms_norm", dim=dim, eps=n.attrs["eps"])
        out = self.buf(n.name, n.type.shape)
        self.call(kern, self.ref(r), self.ref(y), self.weight(w), out)
        return out

    def op_take_last(self, n: Node) -> str:
        src = self.ref(n.inputs[0])
        # the source buffer's layout (e.g. PLE inputs are [T, L*P] here, [T, L, P] in the graph)
        trailing = self.prog.buffers[src[2:]][0][1:] if src.startswith("a:") else list(n.type.shape[1:])
        dtype = self.opt.index_dtype if n.type.dtype == "int64" else n.type.dtype  # positions: the index dtype
        out = self.buf(n.name, [n.attrs["count"], *trailing], dtype)
        self.call("last", src, out, count=n.attrs["count"])
        return out

    def op_gated_mlp(self, n: Node) -> str:
        x, norm, w_gate_up, w_down = n.inputs
        rows, hidden = x.type.shape
        inter = w_gate_up.type.shape[0] // 2
        h = self.rms(self.ref(x), self.weight(norm), hidden, n.attrs["eps"], f"{n.name}_in", rows)
        gu = self.linear(h, self.weight(w_gate_up), hidden, 2 * inter, f"{n.name}_gate_up", rows)
        kern = self.kernel("gelu_mul", inter=inter)
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
        kern = self.kernel("softcap", dim=vocab, cap=cap)
        out = self.buf(n.name, n.type.shape)
        self.call(kern, logits, out)
        return out

    def op_linear(self, n: Node) -> str:
        x, w = n.inputs
        rows, k = x.type.shape
        return self.linear(self.ref(x), self.weight(w), k, w.type.shape[0], n.name, rows)

    def op_pool_rows(self, n: Node) -> str:
        x, index = n.inputs
        kern = self.kernel("pool_rows", dim=x.type.shape[1], k=index.type.shape[1])
        out = self.buf(n.name, n.type.shape)
        self.call(kern, self.ref(x), self.ref(index), out)
        return out

    def op_where_rows(self, n: Node) -> str:
        mask, a, b = n.inputs
        out = self.buf(n.name, n.type.shape)
        self.call(self.kernel("where_rows", dim=a.type.shape[1]), self.ref(mask), self.ref(a), self.ref(b), out)
        return out

    def op_encoder_attention(self, n: Node) -> str:
        """A vision-encoder layer: the projections as in `op_fused_attention`, q and k rotated by axial
        RoPE, and the attention kernels read this call's K and V as a full cache of T slots, every
        query reaching the last one (`reach`)."""
        x, xy, positions, reach, in_norm, w_qkv, q_norm, k_norm, w_o = n.inputs
        a = n.attrs
        rows, hidden = x.type.shape
        nh, nkv, hd, eps = a["q_heads"], a["kv_heads"], a["head_dim"], a["eps"]
        h = self.rms(self.ref(x), self.weight(in_norm), hidden, eps, f"{n.name}_in", rows)
        total = (nh + 2 * nkv) * hd
        proj = self.linear(h, self.weight(w_qkv), hidden, total, f"{n.name}_proj", rows)
        inv_freq = self.rope_table(RopeSpec("default", a["theta"]), hd // 2)
        heads = []
        for tag, offset, count, norm in (("q", 0, nh, q_norm), ("k", nh, nkv, k_norm), ("v", nh + nkv, nkv, None)):
            rotate = norm is not None
            kern = self.kernel("head_norm_rope", total=total, offset=offset, heads=count, head_dim=hd, eps=eps,
                               weighted=rotate, rope=rotate, **({"axes": 2} if rotate else {}))
            out = self.buf(f"{n.name}_{tag}", (rows, count, hd))
            args = [proj, self.ref(xy), self.weight(norm), inv_freq] if rotate else [proj, self.ref(positions)]
            self.call(kern, *args, out)
            heads.append(out)
        attn = self.attend(n.name, heads, self.ref(positions), self.ref(reach), dict(
            q_heads=nh, kv_heads=nkv, head_dim=hd, window=None, k_from_v=False), rows)
        flat = self.buf(f"{n.name}_attn_flat", (rows, nh * hd))
        self.call("reshape", attn, flat)
        return self.linear(flat, self.weight(w_o), nh * hd, hidden, n.name, rows)

    def attend(self, name: str, qkv: list[str], pos: str, reach: str | None, shape: dict, rows,
               rebuild: list[str] = ()) -> str:
        """The attention kernel(s) of q over K/V (buffers or cache slots) → [rows, heads, head_dim]: one
        kernel, or split-K ranges and their merge (`LoweringOptions.split_attention`); `reach` adds each
        query's last visible position, `rebuild` the k_norm and RoPE table that rebuild K from V (k_eq_v)."""
        extra = {"reach": True} if reach else {}
        if not self.opt.split_attention:
            kern = self.kernel("attention", **shape, **extra)
        elif self.decode:
            kern = self.kernel("attention_split", **shape, **extra)
        else:  # many queries: tiled over queries
            kern = self.kernel("prefill_attention_split", **shape, shared_bytes=self.opt.shared_memory, **extra)
        nh, hd = shape["q_heads"], shape["head_dim"]
        attn = self.buf(f"{name}_attn", (rows, nh, hd))
        parts = attention_parts(shape["window"]) if self.opt.split_attention else None
        result = self.buf(f"{name}_attn_parts", (rows, nh, parts, hd + 2)) if parts else attn
        self.call(kern, *qkv, pos, *([reach] if reach else []), *rebuild, result)
        if parts:
            self.call(self.kernel("attention_merge", q_heads=nh, head_dim=hd, parts=parts), result, attn)
        return attn

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
                self.call(self.kernel("cache_write", kv_heads=nkv, head_dim=hd), f"kv:{slot}", new, pos)
        shape = dict(q_heads=nh, kv_heads=nkv, head_dim=hd, window=a["window"], k_from_v=k_from_v)
        if k_from_v:  # the k_norm that rebuilds K: this layer's own, or its donor's (input 7 of a reuse node)
            k_norm = n.inputs[5] if a["role"] == "own" else n.inputs[7]
            attn = self.attend(n.name, [q, f"kv:{a['v_slot']}"], pos, None, shape, rows, [self.weight(k_norm), inv_freq])
        else:
            reach = self.ref(n.inputs[-1]) if a.get("reach") else None  # a media prompt's sliding layer
            attn = self.attend(n.name, [q, f"kv:{a['k_slot']}", f"kv:{a['v_slot']}"], pos, reach, shape, rows)
        w_o = n.inputs[5] if a["role"] == "reuse" else n.inputs[6]
        flat = self.buf(f"{n.name}_attn_flat", (rows, nh * hd))
        self.call("reshape", attn, flat)
        return self.linear(flat, self.weight(w_o), nh * hd, hidden, n.name, rows)

    def _heads(self, proj, pos, w, inv_freq, total, offset, heads, hd, eps, weighted, rope, out_name, rows) -> str:
        kern = self.kernel("head_norm_rope", total=total, offset=offset, heads=heads, head_dim=hd, eps=eps,
                           weighted=weighted, rope=rope)
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
        if table.type.shape[-1] % GROUP:  # rows that are not whole groups stay in the weight dtype
            self.out.host_quant = None
        gathered = self.buf(f"{n.name}_rows", (rows_dim, layers * dim))
        self.call("rows", self.ref(ids), gathered, table=name)
        proj = self.linear(self.ref(x), self.weight(w_proj), x.type.shape[1], layers * dim, f"{n.name}_proj", rows_dim)
        kern = self.kernel("ple_mix", layers=layers, dim=dim, eps=a["eps"], table_scale=a["table_scale"],
                           proj_scale=a["proj_scale"], mix_scale=a["mix_scale"])
        out = self.buf(n.name, (rows_dim, layers * dim))
        self.call(kern, gathered, proj, self.weight(norm), out)
        return out

    def op_ple_epilogue(self, n: Node) -> str:
        x, ple, w_gate, w_proj, norm = n.inputs
        rows, hidden = x.type.shape
        layers, dim = self.cfg.num_hidden_layers, self.cfg.hidden_size_per_layer_input
        g = self.linear(self.ref(x), self.weight(w_gate), hidden, dim, f"{n.name}_gate", rows)
        index = n.attrs["index"]
        kern = self.kernel("ple_gate", layers=layers, dim=dim, index=index)
        gated = self.buf(f"{n.name}_gated", (rows, dim))
        self.call(kern, g, self.ref(ple), gated)
        y = self.linear(gated, self.weight(w_proj), dim, hidden, f"{n.name}_proj", rows)
        kern = self.kernel("add_rms_norm", dim=hidden, eps=n.attrs["eps"])
        out = self.buf(n.name, (rows, hidden))
        self.call(kern, self.ref(x), y, self.weight(norm), out)
        return out

    def op_moe(self, n: Node) -> str:
        r, scale, w_router, pes, pre_norm, gate_up, down, post_norm = n.inputs
        a = n.attrs
        rows, hidden = r.type.shape
        experts, inter2, _ = gate_up.type.shape
        inter, top_k, eps = inter2 // 2, a["top_k"], a["eps"]
        kern = self.kernel("router_input", dim=hidden, eps=eps, input_scale=a["router_input_scale"])
        z = self.buf(f"{n.name}_router_in", (rows, hidden))
        self.call(kern, self.ref(r), self.weight(scale), z)
        logits = self.linear(z, self.weight(w_router), hidden, experts, f"{n.name}_router_logits", rows)
        kern = self.kernel("router_topk", experts=experts, top_k=top_k)
        idx = self.buf(f"{n.name}_idx", (rows, top_k), self.opt.index_dtype)
        wts = self.buf(f"{n.name}_w", (rows, top_k))
        self.call(kern, logits, self.weight(pes), idx, wts)
        e_in = self.rms(self.ref(r), self.weight(pre_norm), hidden, eps, f"{n.name}_in", rows)
        # the expert banks, quantized along their reduction axis as the linear matrices are (K = hidden for
        # gate_up, inter for down): their kernel arguments and storage (a float dtype or q8/q4)
        gate_up_args, gate_up_storage = self.bank(self.weight(gate_up), hidden)
        down_args, down_storage = self.bank(self.weight(down), inter)
        e_out = self.buf(f"{n.name}_experts", (rows, hidden))
        shape = dict(hidden=hidden, inter=inter, experts=experts, top_k=top_k)
        if self.opt.split_moe and not self.decode:  # many tokens: grouped by expert
            self.grouped_experts(n.name, e_in, idx, wts, (gate_up_args, down_args), (gate_up_storage, down_storage),
                                 e_out, rows, shape)
        elif self.opt.split_moe:  # two kernels: the activations go through memory instead of float atomics
            act = self.buf(f"{n.name}_act", (rows, top_k, inter))
            self.call(self.kernel("moe_gate_up", **shape, storage=gate_up_storage), e_in, idx, wts, *gate_up_args, act)
            self.call(self.kernel("moe_down", **shape, storage=down_storage), act, idx, *down_args, e_out)
        else:
            integer = self.opt.int8_dot and gate_up_storage in SCHEMES and down_storage in SCHEMES
            op = "moe_experts_qdot" if integer else "moe_experts" if self.decode else "moe_experts_grouped"
            kern = self.kernel(op, **shape,
                               gate_up_storage=gate_up_storage, down_storage=down_storage)
            self.call(kern, e_in, idx, wts, *gate_up_args, *down_args, e_out)
        return self.rms(e_out, self.weight(post_norm), hidden, eps, n.name, rows)

    def bank(self, w: str, k: int) -> tuple[list[str], str]:
        """An expert bank [E, N, k] (`matrix`): its kernel arguments and storage, the quantization's
        name when quantized (data and scales), else the weight dtype (the bank itself)."""
        args, scheme = self.matrix(w, k)
        return args, scheme or self.out.weight_dtype

    def grouped_experts(self, name: str, x: str, idx: str, wts: str, weights: tuple[list[str], list[str]],
                        storages: tuple[str, str], out: str, rows, shape: dict) -> None:
        """Prefill MoE: `moe_align` sorts the routed (token, slot) entries into per-expert tiles,
        two grouped GEMMs run over the tiles (each weight row read once per tile of entries), and
        `moe_combine` sums each token's top-k outputs. `weights`: the gate_up and down banks' kernel
        arguments, `storages` their storage."""
        hidden, top_k = shape["hidden"], shape["top_k"]
        (gate_up_args, down_args), (gate_up_storage, down_storage) = weights, storages
        tile_expert = self.buf(f"{name}_tile_expert", (rows, top_k), "int32")
        tile_entries = self.buf(f"{name}_tile_entries", (rows, top_k, GEMM_TILE), "int32")
        self.call(self.kernel("moe_align", experts=shape["experts"], top_k=top_k), idx, tile_expert, tile_entries)
        act = self.buf(f"{name}_act", (rows, top_k, shape["inter"]))
        self.call(self.kernel("moe_gate_up_grouped", **shape, storage=gate_up_storage), x, wts, *gate_up_args,
                  tile_expert, tile_entries, act)
        parts = self.buf(f"{name}_parts", (rows, top_k, hidden))
        self.call(self.kernel("moe_down_grouped", **shape, storage=down_storage), act, *down_args, tile_expert,
                  tile_entries, parts)
        self.call(self.kernel("moe_combine", hidden=hidden, top_k=top_k), parts, out)


def lower(cfg: ModelConfig, graphs: dict[str, Graph], options: LoweringOptions, weight_dtype: str = "float32",
          quant: str | None = None, host_quant: str | None = None,
          stored_scheme: Callable[[str], str | None] | None = None) -> Lowered:
    """Lower the optimized graphs (prefill, prefill_all, decode) into one set of kernel specs and their
    programs, structured as the target's `options` ask; `quant` group-quantizes the linear and
    embedding matrices and the MoE expert banks, `host_quant` the host tables (`g4c.quant`);
    `stored_scheme(tensor)` names the scheme a checkpoint tensor is already stored in (kept as it is)."""
    out = Lowered({}, {}, {}, {}, [], options, weight_dtype, quant=quant, host_quant=host_quant,
                  stored_scheme=stored_scheme)
    for mode, graph in graphs.items():
        program = Program(mode)
        names = [n.attrs["name"] for n in graph.inputs]
        if names != ["ids", "positions"]:  # a media prefill or an encoder: its inputs are listed
            program.inputs = [(n.attrs["name"], list(n.type.shape),
                               options.index_dtype if n.type.dtype == "int64" else n.type.dtype) for n in graph.inputs]
        _Lowering(cfg, out, program).lower(graph)
        out.programs[mode] = program
    if not out.host_tables:
        out.host_quant = None
    return out
