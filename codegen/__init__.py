"""g4c.codegen — lowering of the fused g4c IR to Apache TVM (Relax + TensorIR)."""
