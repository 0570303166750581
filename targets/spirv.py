"""SPIR-V for a Vulkan artifact, to ship in an app that drives Vulkan itself (Android NDK, no wgpu).

The WGSL kernels go through naga, wgpu's own shader translator (npm `naga-wasm`, run by node: the
same translation wgpu-native performs at load time), and every module is checked with `spirv-val`
(Debian `spirv-tools`) for the Vulkan 1.1 environment. Bindings are those of the WGSL (group 0:
the buffers in the manifest's `launches` order, then the `PODArgs` uniform), so the artifact's
launch records apply unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from g4c.atomic import atomic_directory, check_writable
from g4c.errors import G4CError

NAGA_PACKAGE = "naga-wasm@30.1.0"
SCRIPT = Path(__file__).with_name("naga_spirv.mjs")


def naga_directory() -> Path:
    """naga-wasm under $G4C_CACHE (default ~/.cache/g4c), installed from npm on first use."""
    cache = Path(os.environ.get("G4C_CACHE", Path.home() / ".cache" / "g4c")) / "naga"
    package = cache / "node_modules" / "naga-wasm"
    if (package / "dist" / "node.js").is_file():
        return package
    if shutil.which("npm") is None or shutil.which("node") is None:
        raise G4CError("g4c spirv needs node and npm (Debian: apt-get install nodejs npm)")
    cache.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(cache),
                             NAGA_PACKAGE], capture_output=True, text=True)
    if result.returncode != 0 or not (package / "dist" / "node.js").is_file():
        raise G4CError(f"npm install {NAGA_PACKAGE} failed: {result.stderr.strip()[-300:]}")
    return package


def emit_spirv(artifact: Path, output: Path, overwrite: bool = False,
               progress: Callable[[str, int, int], None] | None = None) -> list[str]:
    """Write OUTPUT/<kernel>.spv for every WGSL kernel of a Vulkan artifact plus launches.json;
    returns the kernel names. Each module is validated with spirv-val."""
    from g4c.artifact import SHADERS, read_manifest, split_source

    manifest = read_manifest(artifact)
    if manifest.runtime != "wgpu":
        raise G4CError(f"{artifact} is a {manifest.target} artifact; SPIR-V comes from --target vulkan ones")
    if shutil.which("spirv-val") is None:
        raise G4CError("spirv-val not found (Debian: apt-get install spirv-tools)")
    check_writable(output, overwrite)
    naga = naga_directory()
    sources = split_source((artifact / SHADERS).read_text())
    report = progress or (lambda stage, done, total: None)
    with atomic_directory(output, overwrite) as tmp, tempfile.TemporaryDirectory() as scratch:
        pairs = []
        for name, source in sources.items():
            wgsl = Path(scratch) / f"{name}.wgsl"
            wgsl.write_text(source)
            pairs += [str(wgsl), str(tmp / f"{name}.spv")]
        report("translating WGSL to SPIR-V (naga)", 0, 1)
        result = subprocess.run(["node", str(SCRIPT), str(naga), *pairs], capture_output=True, text=True)
        if result.returncode != 0:
            raise G4CError(f"naga could not translate the kernels: {result.stderr.strip().splitlines()[-1:]}")
        for i, name in enumerate(sources):
            check = subprocess.run(["spirv-val", "--target-env", "vulkan1.1", str(tmp / f"{name}.spv")],
                                   capture_output=True, text=True)
            if check.returncode != 0:
                raise G4CError(f"spirv-val rejected {name}: {(check.stderr or check.stdout).strip()[:300]}")
            report("validating SPIR-V", i + 1, len(sources))
        (tmp / "launches.json").write_text(json.dumps(manifest.launches, indent=1) + "\n")
    return list(sources)
