"""g4c — a compiler for Google's Gemma 4 model family.

Frontend (`g4c.config`, `g4c.weights`, `g4c.frontend`) → graph IR (`g4c.ir`) → passes (`g4c.passes`) →
TVM codegen (`g4c.codegen`) for targets (`g4c.targets`), executed by `g4c.runtime`.
"""

__version__ = "0.1.0"
