"""What `g4c inspect` reports: per-layer structure, KV producers/consumers, parameter counts and bytes."""

from __future__ import annotations

import math
from dataclasses import dataclass

from g4c.config import ModelConfig
from g4c.dtypes import DTYPE_BYTES
from g4c.weights import expected_shapes


@dataclass
class LayerRow:
    index: int
    kind: str
    head_dim: int
    kv_heads: int
    window: int | None
    kv_role: str  # "own", "store → 5,7", "reuse ← 3"
    mlp: int
    params: int


def layer_rows(cfg: ModelConfig) -> list[LayerRow]:
    shapes = expected_shapes(cfg)
    consumers: dict[int, list[int]] = {}
    for spec in cfg.layers:
        if spec.kv_mode == "reuse":
            consumers.setdefault(spec.kv_source, []).append(spec.index)
    rows = []
    for spec in cfg.layers:
        prefix = f"layers.{spec.index}."
        params = sum(math.prod(s) for n, s in shapes.items() if n.startswith(prefix))
        if spec.kv_mode == "reuse":
            role = f"reuse ← {spec.kv_source}"
        elif spec.index in consumers:
            role = "store → " + ",".join(map(str, consumers[spec.index]))
        else:
            role = "own"
        rows.append(LayerRow(spec.index, spec.kind, spec.head_dim, spec.num_kv_heads, spec.window, role,
                             spec.mlp_intermediate, params))
    return rows


def parameter_totals(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts: total, embedding, PLE table (host-side gather), layers, experts."""
    shapes = expected_shapes(cfg)
    count = {n: math.prod(s) for n, s in shapes.items()}
    return {
        "total": sum(count.values()),
        "embedding": count["embed_tokens.weight"],
        "ple_table": count.get("embed_tokens_per_layer.weight", 0),
        "layers": sum(v for n, v in count.items() if n.startswith("layers.")),
        "experts": sum(v for n, v in count.items() if ".experts." in n),
    }


def kv_bytes_per_token(cfg: ModelConfig, dtype: str) -> int:
    """K+V bytes one token adds to the cache (KV-shared layers add none)."""
    per = DTYPE_BYTES[dtype]
    return sum(2 * s.num_kv_heads * s.head_dim * per for s in cfg.layers if s.kv_mode != "reuse")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
