"""Where the TVM runtime libraries an artifact lists (`Manifest.runtime_libraries`) are found: used by
the runtime to load them and by `compile --bundle-runtime` to copy them into the artifact."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def find_runtime_library(name: str, directory: Path | None = None) -> Path | None:
    """A TVM runtime library (or libcudart): $G4C_TVM_RUNTIME's folder, the artifact `directory`
    (--bundle-runtime), an installed TVM wheel, the nvidia-cuda-runtime wheel, the CUDA toolkit."""
    candidates = []
    if os.environ.get("G4C_TVM_RUNTIME"):
        runtime = Path(os.environ["G4C_TVM_RUNTIME"])
        candidates.append(runtime if name == "libtvm_runtime.so" else runtime.parent / name)
    if directory is not None:
        candidates.append(directory / name)
    candidates += [Path(p) / "tvm" / "lib" / name for p in sys.path if p]
    candidates += [Path(p) / "nvidia" / "cu13" / "lib" / name for p in sys.path if p]
    candidates += [Path("/usr/local/cuda/lib64") / name, Path("/usr/local/cuda/lib") / name]
    return next((c for c in candidates if c.is_file()), None)
