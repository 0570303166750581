"""g4c.runtime — executes models: sampling and the generation loop shared by every backend.

Imports only numpy here (the compiled-artifact runtime must run on devices without the compiler)."""

from g4c.runtime.sampling import Sampler

__all__ = ["Sampler"]
