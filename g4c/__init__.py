"""g4c — a compiler for Google's Gemma 4 model family.

Frontend (`g4c.config`, `g4c.weights`, `g4c.frontend`) → graph IR (`g4c.ir`) → passes (`g4c.passes`) →
TVM codegen (`g4c.codegen`) for targets (`g4c.targets`), executed by `g4c.runtime`.
"""

__version__ = "0.1.0"


def load(directory, max_context=None, prefill_chunk=64):
    """Open a compiled artifact (see `g4c.runtime.artifact.load`); needs no compiler."""
    from g4c.runtime.artifact import load as _load

    return _load(directory, max_context, prefill_chunk)
