"""Kernel requests: what the lowering asks a target for, as typed values instead of name strings.

A `KernelSpec` names an operation from the closed set `OPS` and its static parameters (sizes, eps,
window, weight storage: a dtype, or a quantization scheme for the `_q` ops and the MoE expert banks,
...). The lowering emits specs; a target maps each spec to a TensorIR builder and a schedule
(`g4c.targets.base.Target.kernel`); schedules, the Relax module builder, `bench` and the profiler
dispatch on `spec.op` and read `spec.params`. `spec.name` is derived for display and as
the kernel's symbol, never parsed back.

`LoweringOptions` are the choices a target makes about program structure (not about kernels): index
dtype, split-K attention with a merge step, grouped MoE, one-row decode linears, table splitting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# op → what the kernel computes (the builders' docstrings in codegen/kernels.py and gpu_kernels.py say how)
OPS = {
    "embed": "rows of an embedding table for the token ids",
    "embed_rows": "rows of one slice [lo, lo + rows) of a table split for a storage binding (float or q8/q4)",
    "linear": "y = x · Wᵀ (rows = 1: a one-row decode GEMV; None: any number of rows)",
    "linear_tiled": "y = x · Wᵀ as a shared-memory tiled GEMM (GPU targets without a GEMM schedule rule)",
    "linear_q": "y = x · Wᵀ with W group-quantized (q8/q4), dequantized inside the reduction",
    "linear_qdot": "y = x · Wᵀ with W group-quantized (q8/q4) and x quantized to int8 per group: integer dot products",
    "embed_q": "rows of a group-quantized embedding table, dequantized as gathered",
    "place_columns": "copy a column slice of the logits into place (split LM head)",
    "rms_norm": "RMS norm, with or without a weight",
    "add_rms_norm": "residual add + RMS norm",
    "head_norm_rope": "per-head RMS norm and RoPE (axes 2: axial, the vision tower) of a slice of the packed q/k/v projection",
    "cache_write": "write new K or V rows into a KV cache (ring or full), in place",
    "attention": "causal GQA attention with an optional sliding window (reach: each query's last visible key), one kernel",
    "attention_split": "attention over key ranges: per-range partial softmax outputs (decode)",
    "prefill_attention_split": "attention_split tiled over queries (prefill)",
    "attention_merge": "merge the key ranges' partial softmaxes exactly",
    "gelu_mul": "gelu(gate) · up",
    "pool_rows": "mean of k gathered rows per output row (the vision pooler)",
    "where_rows": "rows of a where mask is set, else of b (soft tokens placed into a media prompt)",
    "scale_rows": "x · s for a one-element weight s",
    "add": "a + b",
    "softcap": "cap · tanh(x / cap)",
    "ple_mix": "per-layer-embedding inputs: projection + table rows, normed and mixed",
    "ple_gate": "per-layer-embedding gate of one layer",
    "router_input": "MoE router input: RMS norm and scale",
    "router_topk": "MoE top-k: softmax, top-k, renormalise, per-expert scale",
    "moe_experts": "MoE experts of the top-k, summed (one kernel; each bank's storage a float dtype or q8/q4)",
    "moe_experts_grouped": "moe_experts for a prefill chunk (same math; CPUs: grouped GEMMs per expert)",
    "moe_experts_qdot": "moe_experts with q8/q4 banks and int8 activations: integer dot products",
    "moe_gate_up": "MoE gate/up + gelu for each routed (token, slot) (bank storage: a float dtype or q8/q4)",
    "moe_down": "MoE down-projection summed over the top-k (bank storage: a float dtype or q8/q4)",
    "moe_align": "sort routed (token, slot) entries into per-expert tiles",
    "moe_gate_up_grouped": "moe_gate_up as a GEMM over per-expert tiles",
    "moe_down_grouped": "moe_down as a GEMM over per-expert tiles (per-slot outputs)",
    "moe_combine": "sum each token's top-k expert outputs",
    # the audio tower (codegen/audio_kernels.py; `shape`: the op's shape, its symbolic rows written "T")
    "conv2d": "2-D convolution over [rows, freq, channels] (the audio subsampling: 3x3, stride 2, zero padding, no bias)",
    "layer_norm": "layer norm over the last axis with a weight, no bias",
    "relu": "max(x, 0)",
    "silu": "x · sigmoid(x)",
    "softplus": "log(1 + eˣ) (of a weight: a recipe instead)",
    "clamp": "x clamped to the 0-d bounds lo, hi (the clippable linears' checkpoint buffers)",
    "clip": "x clamped to ±limit",
    "glu": "a · sigmoid(b) of the halves of the last axis",
    "depthwise_conv1d": "causal per-channel 1-D convolution over rows",
    "local_attention": "the audio tower's chunked local attention with relative-position logits and a softcap",
    "add_channels": "x + w along the last axis (a bias)",
    "mul_channels": "x · w along the last axis (a per-channel scale)",
}


@dataclass(frozen=True)
class KernelSpec:
    op: str
    params: tuple[tuple[str, object], ...]  # static parameters, in the builder's keyword names

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"unknown kernel op {self.op!r}")

    @classmethod
    def of(cls, op: str, **params) -> KernelSpec:
        return cls(op, tuple(params.items()))

    def __getitem__(self, key: str):
        return dict(self.params)[key]

    @property
    def kwargs(self) -> dict:
        return dict(self.params)

    @property
    def name(self) -> str:
        """Display name and symbol: op and parameter values, made a C/WGSL identifier."""
        values = [_show(v) for _, v in self.params]
        return re.sub(r"\W", "_", "_".join([self.op, *values]))

    def to_json(self) -> dict:
        return {"op": self.op, **{k: v for k, v in self.params}}

    @classmethod
    def from_json(cls, data: dict) -> KernelSpec:
        data = dict(data)
        return cls.of(data.pop("op"), **data)


def _show(value) -> str:
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "x".join(map(_show, value))
    return "none" if value is None else str(value)


@dataclass(frozen=True)
class LoweringOptions:
    """How a target wants programs structured (set by the target, read by `codegen.lower`)."""

    index_dtype: str = "int64"  # ids, positions and MoE indices (GPUs: int32; WGSL has no i64)
    split_attention: bool = False  # attention over key ranges + merge; prefill tiled over queries
    split_moe: bool = False  # MoE experts as gate/up + down kernels (decode), grouped GEMMs (prefill)
    decode_gemv: bool = True  # decode linears as one-row GEMV kernels, apart from prefill's GEMMs
    tiled_gemm: bool = False  # prefill linears as `linear_tiled` (no GEMM schedule rule on the target)
    shared_memory: int = 16384  # bytes of shared memory per workgroup the tiled kernels may use
    max_binding: int | None = None  # bytes one storage binding may hold: bigger tables are split
    quant_word: str = "uint8"  # how quantized data is declared (g4c.quant): uint8 for CPUs, uint32 for GPUs
    quant_scale: str = "float16"  # storage of the quantization scales: float16 for CPUs, float32 for GPUs
    int8_dot: bool = False  # quantized linears as `linear_qdot` (int8 activations, integer dot products)
