"""fuse_lm_head — final norm, LM head GEMM and logit softcap as one op.

Matches `[softcap(] linear([take_last(] rms_norm(x, w) [)], W) [)]`, the model's last steps.
Produces `lm_head(x', w, W, softcap=cap|None)` where x' is `take_last(x)` when the graph keeps only
the last positions (the row slice moves before the norm: RMSNorm is per row, so slicing first gives
the same rows). Exact: the fused kernel applies norm, GEMM and `cap * tanh(z / cap)` in that order.
"""

from __future__ import annotations

from g4c.ir import Graph
from g4c.passes.manager import Pass, PassContext
from g4c.passes.rewrite import NoMatch, expect, remove_unused


def run(graph: Graph, ctx: PassContext) -> None:
    for key, out in list(graph.outputs.items()):
        try:
            _fuse(graph, key, out)
        except NoMatch:
            continue


def _fuse(graph: Graph, key: str, out) -> None:
    cap = None
    head = out
    if out.op == "softcap":
        cap = out.attrs["cap"]
        (head,) = out.inputs
    x, w = expect(head, "linear")
    keep = None
    if x.op == "take_last":
        keep = x
        (x,) = x.inputs
    src, norm = expect(x, "rms_norm", 2)
    if keep is not None:
        src = graph.call("take_last", src, count=keep.attrs["count"], name="keep_last_rows", before=out)
    fused = graph.call("lm_head", src, norm, w, eps=x.attrs["eps"], softcap=cap, name="lm_head_fused", before=out)
    graph.replace_all_uses(out, fused)
    remove_unused(graph, [out, head, keep, x] if keep is not None else [out, head, x])


PASS = Pass("fuse_lm_head", run, __doc__)
