"""Lowering of the audio tower's ops (`g4c.audio`): a mixin of `g4c.codegen.lower._Lowering`.

After the passes (`passes.DEFAULT_PIPELINE`) the audio graph keeps its ops as the frontend wrote them,
apart from one `add_rms_norm` per layer (the attention's residual); the text path's handlers serve the
rows ops (`linear`, `rms_norm`, `add`, `add_rms_norm`, `scale` of [S, H] rows). This mixin adds:

- one kernel per op with an `codegen.audio_kernels` builder (`conv2d`, `layer_norm`, `relu`, `silu`,
  `clamp`, `clip`, `glu`, `depthwise_conv1d`, `local_attention`, `add_channels`, `mul_channels`),
  requested with the op's static shape (its symbolic row count written "T": one kernel serves the
  clip's T, T1 and S rows alike);
- `reshape` as the runtime step `reshape` (a view);
- constants as weight recipes made at compile time (`g4c.artifact.recipes`): `rel_positions` (the
  relative-position sinusoids) and `softplus` of a weight (the per-dim query scale). Their handlers
  return the recipe's weight reference, so the ops that read them take it as any other operand.
"""

from __future__ import annotations

from g4c.ir import Node

ROWS = "T"  # the symbolic row count in the kernels' shapes (audio_kernels makes one Var per name)


def _shape(node: Node) -> tuple:
    """`node`'s shape with its symbolic dims written ROWS (the kernels' static parameter)."""
    return tuple(ROWS if isinstance(d, str) else d for d in node.type.shape)


class AudioLowering:
    """The `op_<name>` handlers of the audio tower's ops; the helpers (`kernel`, `buf`, `call`, `ref`,
    `weight`) are `_Lowering`'s."""

    def operand(self, node: Node) -> str:
        """A node's reference: a weight (a param, or a weight made by a recipe), else its buffer."""
        if self.is_weight(node):
            return self.weight(node)
        return self.ref(node)

    def elementwise(self, n: Node, op: str, *args: str, **params) -> str:
        """One `op` kernel over n's first input's shape (`audio_kernels` shape builders)."""
        kern = self.kernel(op, shape=_shape(n.inputs[0]), **params)
        out = self.buf(n.name, n.type.shape)
        self.call(kern, *args, out)
        return out

    # -- views and constants -----------------------------------------------------------------------
    def op_reshape(self, n: Node) -> str:
        out = self.buf(n.name, n.type.shape)
        self.call("reshape", self.operand(n.inputs[0]), out)
        return out

    def op_rel_positions(self, n: Node) -> str:
        count, dim = n.attrs["count"], n.attrs["dim"]
        name = f"rel_positions.{count}.{dim}"
        self.out.recipes.setdefault(name, {"rel_positions": [count, dim]})
        return f"w:{name}"

    def op_softplus(self, n: Node) -> str:
        (x,) = n.inputs
        if x.op == "param":  # a constant: made at compile time
            source = x.attrs["name"]
            name = f"{source}.softplus"
            self.out.recipes.setdefault(name, {"softplus": source})
            return f"w:{name}"
        return self.elementwise(n, "softplus", self.ref(x))

    # -- elementwise -------------------------------------------------------------------------------
    def op_relu(self, n: Node) -> str:
        return self.elementwise(n, "relu", self.ref(n.inputs[0]))

    def op_silu(self, n: Node) -> str:
        return self.elementwise(n, "silu", self.ref(n.inputs[0]))

    def op_clip(self, n: Node) -> str:
        return self.elementwise(n, "clip", self.ref(n.inputs[0]), limit=float(n.attrs["limit"]))

    def op_clamp(self, n: Node) -> str:
        """The bounds as [1] weights (a 0-d checkpoint buffer reshaped by a recipe)."""
        x, lo, hi = n.inputs
        return self.elementwise(n, "clamp", self.ref(x), self.scalar(lo), self.scalar(hi), bounds=(1,))

    def scalar(self, node: Node) -> str:
        """A one-value weight as [1]: artifacts hold no 0-d tensors."""
        if node.op != "param" or node.type.shape not in ((), (1,)):
            raise NotImplementedError(f"%{node.name}: only one-value weights are lowered as bounds, got a "
                                      f"{node.op} {node.type}")
        if node.type.shape == (1,):
            return self.weight(node)
        source = node.attrs["name"]
        name = f"{source}.as1"
        self.out.recipes.setdefault(name, {"reshape": [source, [1]]})
        return f"w:{name}"

    def op_add_channels(self, n: Node) -> str:
        x, w = n.inputs
        return self.elementwise(n, "add_channels", self.ref(x), self.operand(w))

    def op_mul_channels(self, n: Node) -> str:
        x, w = n.inputs
        return self.elementwise(n, "mul_channels", self.ref(x), self.operand(w))

    def op_glu(self, n: Node) -> str:
        return self.elementwise(n, "glu", self.ref(n.inputs[0]))

    def op_layer_norm(self, n: Node) -> str:
        x, w = n.inputs
        return self.elementwise(n, "layer_norm", self.ref(x), self.operand(w), eps=float(n.attrs["eps"]))

    # -- convolutions and attention ----------------------------------------------------------------
    def op_conv2d(self, n: Node) -> str:
        """The output rows are the `rows` input's length (the output buffer's first dim), not read."""
        x, w, _rows = n.inputs
        _, freq, cin = x.type.shape
        cout, _, kh, kw = w.type.shape
        if kh != kw:
            raise NotImplementedError(f"conv2d %{n.name}: only square kernels are lowered, got {kh}x{kw}")
        kern = self.kernel("conv2d", freq=freq, cin=cin, cout=cout, kernel=kh, stride=n.attrs["stride"],
                           padding=n.attrs["padding"])
        out = self.buf(n.name, n.type.shape)
        self.call(kern, self.ref(x), self.operand(w), out)
        return out

    def op_depthwise_conv1d(self, n: Node) -> str:
        x, w = n.inputs
        channels, _, k = w.type.shape
        out = self.buf(n.name, n.type.shape)
        self.call(self.kernel("depthwise_conv1d", channels=channels, kernel=k), self.ref(x), self.operand(w), out)
        return out

    def op_local_attention(self, n: Node) -> str:
        q, k, v, rel_k = n.inputs
        a = n.attrs
        _, heads, head_dim = q.type.shape
        kern = self.kernel("local_attention", heads=heads, head_dim=head_dim, rel_rows=rel_k.type.shape[0],
                           chunk=a["chunk"], context_left=a["context_left"], context_right=a["context_right"],
                           softcap=float(a["softcap"]), invalid_logit=float(a["invalid_logit"]))
        out = self.buf(n.name, n.type.shape)
        self.call(kern, *(self.operand(i) for i in (q, k, v, rel_k)), out)
        return out
