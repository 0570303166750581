"""g4c — a compiler for Google's Gemma 4 model family.

Frontend (`g4c.config`, `g4c.weights`, `g4c.frontend`) → graph IR (`g4c.ir`) → passes (`g4c.passes`) →
lowering to kernel specs (`g4c.codegen`) → targets (`g4c.targets`) → artifact (`g4c.artifact`),
executed by `g4c.runtime`. docs/architecture.md maps the slices.
"""

__version__ = "0.1.0"


def load(directory, max_context=None, prefill_chunk=64):
    """Open a compiled artifact (see `g4c.runtime.load`); needs no compiler."""
    from g4c.runtime import load as _load

    return _load(directory, max_context, prefill_chunk)
