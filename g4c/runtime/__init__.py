"""g4c.runtime — runs compiled artifacts: the session core (`session.py`), its executors (the Relax
VM here `relax_vm.py`, over RPC `remote.py`, wgpu `wgpu_executor.py`) and sampling.

Nothing here imports the TVM compiler (`tvm`): devices have no compiler. The RPC client
(`remote.py`) is the exception, as it runs on the host that drives a device.
"""

from __future__ import annotations

from pathlib import Path

from g4c.runtime.sampling import Sampler
from g4c.runtime.session import ArtifactSession, Session


def _executor(runtime: str):
    """The executor class of a manifest's `runtime`."""
    if runtime == "wgpu":
        from g4c.runtime.wgpu_executor import WgpuExecutor

        return WgpuExecutor
    if runtime == "relax-vm":
        from g4c.runtime.relax_vm import RelaxVMExecutor

        return RelaxVMExecutor
    from g4c.artifact import ArtifactError

    raise ArtifactError(f"artifact runtime {runtime!r} is not one this g4c has: recompile it")


def load(directory: str | Path, max_context: int | None = None, prefill_chunk: int = 64,
         runtime_memory: bool = False) -> ArtifactSession:
    """Open a compiled artifact: `g4c.load(DIR).generate([2, 17, 99], 16)`. The manifest names the
    executor (the Relax VM or wgpu); `runtime_memory` puts a CPU artifact's buffers in TVM runtime
    tensors (the GPU code path, for tests)."""
    from g4c.artifact import read_manifest

    runtime = read_manifest(directory, check_files=False).runtime
    executor = _executor(runtime)
    factory = (lambda s: executor(s, runtime_memory=True)) if runtime_memory else executor
    return ArtifactSession(directory, factory, max_context, prefill_chunk)


__all__ = ["ArtifactSession", "Sampler", "Session", "load"]
