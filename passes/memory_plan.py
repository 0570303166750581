"""Static activation memory plan: liveness of every intermediate tensor and buffer reuse.

An analysis, not a rewrite: for concrete symbol values (T tokens, P past), each non-parameter node's
output is live from the node that defines it to its last use (graph outputs to the end). Buffers are
assigned greedily in execution order: a tensor takes the smallest free buffer that is large enough
(best fit), or a new one; a buffer is freed after its tensor's last use. The peak is the sum of
buffer sizes; it is compared with the no-reuse total. Weights, inputs and the KV cache (planned by
`plan_kv_cache`) are not activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from g4c.dtypes import DTYPE_BYTES
from g4c.ir import Graph
from g4c.ir.graph import shape_value
NOT_ACTIVATIONS = ("param", "input", "concat")  # concat only packs weights (done once at compile time)


@dataclass
class ActivationPlan:
    peak_bytes: int  # with buffer reuse
    total_bytes: int  # every intermediate in its own buffer
    buffers: list[int]  # buffer sizes
    assignment: dict[str, int]  # node name → buffer index


def activation_plan(graph: Graph, tokens: int, past: int = 0, dtype: str = "float32", batch: int = 1) -> ActivationPlan:
    env = {"T": tokens, "P": past}
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    last_use: dict[str, int] = {}
    for n in graph.nodes:
        for i in n.inputs:
            last_use[i.name] = order[n.name]
    for out in graph.outputs.values():
        last_use[out.name] = len(graph.nodes)
    buffers: list[int] = []
    free: list[int] = []
    assignment: dict[str, int] = {}
    releases: dict[int, list[int]] = {}
    total = 0
    for step, n in enumerate(graph.nodes):
        for buf in releases.pop(step, []):
            free.append(buf)
        if n.op in NOT_ACTIVATIONS or n.op == "kv_cache":
            continue
        element = n.type.dtype if n.type.dtype in ("int64", "int32") else dtype  # floats at the planned dtype
        size = batch * math.prod(shape_value(n.type.shape, env)) * DTYPE_BYTES[element]
        total += size
        fitting = sorted((buffers[b], b) for b in free if buffers[b] >= size)
        if fitting:
            buf = fitting[0][1]
            free.remove(buf)
        else:
            buf = len(buffers)
            buffers.append(size)
        assignment[n.name] = buf
        # free after the last use (released before the step after it runs)
        releases.setdefault(last_use.get(n.name, step) + 1, []).append(buf)
    return ActivationPlan(sum(buffers), total, buffers, assignment)
