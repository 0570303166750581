"""plan_kv_cache — decide each layer's KV storage and annotate the fused attention ops with it.

Matches `fused_attention` nodes. Produces, per layer:
- `reuse`: KV-sharing layers own no memory; they read their donor's slots (`kv_source`);
- `ring`: sliding producers keep a ring buffer of `sliding_window` positions (`slots`): a sliding
  query at position p reads keys p - window + 1 .. p only;
- `full`: global producers keep every position up to the context length.
For k_eq_v global producers it also sets `k_from_v`: only V is stored and K is rebuilt as
`rope(V * k_norm)` when read (the donor's k_norm becomes an input of its consumers). This is exact
in fp32: V = rms_norm(raw) without scale and K = rope(rms_norm(raw, k_norm)), and transformers'
RMSNorm computes `(raw * r) * w`, so `V * k_norm` is bit-identical to the unrotated K.
The plan (bytes per layer, naive comparison) is left in `graph.meta["kv_plan"]`; `kv_plan()` is the
same computation from a config, for `g4c plan`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from g4c.config import ModelConfig
from g4c.dtypes import DTYPE_BYTES
from g4c.ir import Graph
from g4c.passes.manager import Pass, PassContext


@dataclass
class LayerKV:
    layer: int
    kind: str  # sliding | global
    storage: str  # reuse | ring | full
    source: int  # the layer whose cache this layer reads
    slots: int  # positions stored (0 for reuse)
    tensors: int  # 2 (K and V) or 1 (V only, K rebuilt: k_eq_v)
    kv_heads: int
    head_dim: int
    bytes: int


def kv_plan(cfg: ModelConfig, context: int, batch: int = 1, dtype: str = "bfloat16",
            single_tensor_k_eq_v: bool = True) -> list[LayerKV]:
    """The KV memory plan for `batch` sequences of up to `context` positions."""
    per = DTYPE_BYTES[dtype]
    plan = []
    for s in cfg.layers:
        if s.kv_mode == "reuse":
            storage, slots, tensors = "reuse", 0, 0
        elif s.is_sliding:
            storage, slots, tensors = "ring", min(cfg.sliding_window, context), 2
        else:
            storage, slots, tensors = "full", context, 1 if (s.k_eq_v and single_tensor_k_eq_v) else 2
        plan.append(LayerKV(s.index, s.kind, storage, s.kv_source, slots, tensors, s.num_kv_heads, s.head_dim,
                            batch * slots * tensors * s.num_kv_heads * s.head_dim * per))
    return plan


def naive_kv_bytes(cfg: ModelConfig, context: int, batch: int = 1, dtype: str = "bfloat16") -> int:
    """Every layer keeps full-length K and V (no sharing, no ring buffers, no K/V merging)."""
    return sum(batch * context * 2 * s.num_kv_heads * s.head_dim * DTYPE_BYTES[dtype] for s in cfg.layers)


def run(graph: Graph, ctx: PassContext) -> None:
    context = ctx.cfg.max_position_embeddings
    plan = {p.layer: p for p in kv_plan(ctx.cfg, context)}
    fused = [n for n in graph.nodes if n.op == "fused_attention"]
    by_layer = {n.attrs["layer"]: n for n in fused}
    for node in fused:
        p = plan[node.attrs["layer"]]
        node.attrs.update(cache=p.storage, slots=p.slots, k_from_v=p.tensors == 1)
    for node in fused:
        donor = by_layer.get(node.attrs["kv_source"])
        if node.attrs["role"] == "reuse" and donor is not None and donor.attrs["k_from_v"]:
            node.attrs["k_from_v"] = True
            if len(node.inputs) == 7 + bool(node.attrs.get("reach")):  # the donor's k_norm rebuilds K from V
                node.inputs = node.inputs[:7] + (donor.inputs[5],) + node.inputs[7:]
    graph.meta["kv_plan"] = [asdict(p) for p in plan.values()]


PASS = Pass("plan_kv_cache", run, __doc__)
