"""g4c.ir — the graph IR: `Graph`, `Node`, `TensorType`, the closed op set, the verifier, the text
and DOT printers, and the reference `Interpreter` (numpy fp32 with a KV-cache state)."""

from g4c.ir.graph import Dim, Graph, Node, TensorType, dim_add, dim_value
from g4c.ir.interpreter import Interpreter, KVState
from g4c.ir.ops import OPS, IRTypeError
from g4c.ir.printer import format_graph, to_dot, write_dot
from g4c.ir.verify import VerificationError, verify

__all__ = ["Dim", "Graph", "Node", "TensorType", "dim_add", "dim_value", "Interpreter", "KVState", "OPS",
           "IRTypeError", "format_graph", "to_dot", "write_dot", "VerificationError", "verify"]
