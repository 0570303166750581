"""Run a compiled g4c artifact with only numpy, safetensors and `tvm_ffi` (+ the TVM runtime library).

`load(DIR)` checks the manifest (format, g4c version, SHA-256 of every file), loads the Relax VM
executable with `tvm_ffi.load_module` (`vm_load_executable`), maps the weights, allocates the KV caches
from the plan
(ring buffers of window + chunk - 1 slots for sliding producers, `max_context` rows for global
producers, nothing for KV-sharing layers, which read their donor's buffers) and returns a `Session`
with `prefill` (chunked), `decode`, `generate` and `reset`.

Nothing here imports the TVM compiler (`tvm`, `tvm.relax`): devices have no compiler.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from g4c import __version__
from g4c.config import config_from_dict
from g4c.errors import G4CError
from g4c.runtime.session import Session

FORMAT = "g4c-artifact"
FORMAT_VERSION = 2  # 2: Relax VM executable with prefill/prefill_all/decode entry functions
MANIFEST = "manifest.json"
LIBRARY = "kernels.so"
WEIGHTS = "weights.safetensors"
HOST = "host.safetensors"


ALIGNMENT = 64  # TVM kernels assume 64-byte aligned buffers (aligned vector loads)
DEVICE_CPU = 1  # DLPack device type
POOLED_ALLOCATOR = 2  # Relax VM allocator kind


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised numpy array whose data pointer is ALIGNMENT-byte aligned."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    offset = (-raw.ctypes.data) % ALIGNMENT
    return raw[offset: offset + nbytes].view(dtype).reshape(shape)


def aligned(array: np.ndarray) -> np.ndarray:
    if array.ctypes.data % ALIGNMENT == 0 and array.flags.c_contiguous:
        return array
    out = aligned_empty(array.shape, array.dtype)
    out[...] = array
    return out


class ArtifactError(G4CError):
    """A missing, corrupt, modified or incompatible artifact."""


# safetensors dtype -> numpy storage; bf16 travels to the kernels as its uint16 bit pattern (DLPack from
# numpy has no bf16), which is also how the kernels read it
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64, "I32": np.int32}


def read_aligned_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, read straight into its own ALIGNMENT-aligned buffer.

    safetensors' own loaders return unaligned copies, and realigning them costs a second copy of the
    largest tensor (the 1.6 GB LM head of E2B); reading into place keeps peak memory at the weights'
    size. The layout (8-byte little-endian header length, JSON header with dtype/shape/data_offsets,
    then the byte buffer) is the documented safetensors format."""
    with open(path, "rb") as f:
        try:
            (length,) = np.frombuffer(f.read(8), dtype="<u8")
            header = json.loads(f.read(int(length)))
        except (ValueError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{path}: corrupt safetensors header ({exc})") from None
        start = 8 + int(length)
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ArtifactError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            array = aligned_empty(info["shape"], _SAFETENSORS_DTYPES[info["dtype"]])
            begin, end = info["data_offsets"]
            if end - begin != array.nbytes:
                raise ArtifactError(f"{path}: tensor {name} has {end - begin} bytes, its shape needs {array.nbytes}")
            f.seek(start + begin)
            if f.readinto(memoryview(array.reshape(-1)).cast("B")) != array.nbytes:
                raise ArtifactError(f"{path}: truncated at tensor {name}")
            tensors[name] = array
    return tensors


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: str | Path, check_files: bool = True) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a g4c artifact (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: corrupt manifest ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"artifact format v{manifest.get('format_version')} is not the v{FORMAT_VERSION} this g4c "
                            "reads: recompile it")
    if manifest.get("g4c_version") != __version__:
        raise ArtifactError(f"artifact was compiled by g4c {manifest.get('g4c_version')}, this is g4c {__version__}: "
                            "recompile it")
    if check_files:
        for name, digest in manifest.get("files", {}).items():
            f = directory / name
            if not f.is_file():
                raise ArtifactError(f"artifact file {name} is missing")
            if sha256_file(f) != digest:
                raise ArtifactError(f"artifact file {name} is corrupt or was modified (SHA-256 mismatch)")
    return manifest


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _load_runtime_library(directory: Path) -> None:
    """Load TVM's runtime library (thread pool of the parallel kernels) without importing the compiler:
    $G4C_TVM_RUNTIME, else one bundled in the artifact, else the one inside an installed TVM wheel."""
    import sys

    candidates = [Path(os.environ["G4C_TVM_RUNTIME"])] if os.environ.get("G4C_TVM_RUNTIME") else []
    candidates.append(directory / "libtvm_runtime.so")
    candidates += [Path(p) / "tvm" / "lib" / "libtvm_runtime.so" for p in sys.path if p]
    for candidate in candidates:
        if candidate.is_file():
            ctypes.CDLL(str(candidate), mode=ctypes.RTLD_GLOBAL)
            return
    raise ArtifactError("libtvm_runtime.so not found: install apache-tvm, bundle it in the artifact, "
                        "or set G4C_TVM_RUNTIME")


def _check_machine(manifest: dict) -> None:
    """An artifact's kernels are machine code for its target's CPU: say so instead of failing in dlopen."""
    import platform

    wanted = "aarch64" if manifest.get("target", "").startswith("arm") else None
    here = platform.machine().lower()
    if wanted and here not in (wanted, "arm64"):
        raise ArtifactError(f"artifact was compiled for {manifest['target']} ({wanted}); this machine is {here}")


class CompiledSession(Session):
    """Calls the artifact's Relax VM entry functions; the KV caches are numpy buffers the kernels
    update in place."""

    def __init__(self, directory: str | Path, max_context: int | None = None, prefill_chunk: int = 64):
        import tvm_ffi
        from safetensors import safe_open

        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        _check_machine(self.manifest)
        self._ffi = tvm_ffi
        _load_runtime_library(self.directory)
        try:
            self.vm = tvm_ffi.load_module(str(self.directory / LIBRARY))["vm_load_executable"]()
            self.vm["vm_initialization"](DEVICE_CPU, 0, POOLED_ALLOCATOR)
        except Exception as exc:  # noqa: BLE001 - surfaced as one line
            raise ArtifactError(f"cannot load the compiled model: {exc}") from None
        self.config = self.manifest["config"]
        model = config_from_dict(self.config, source=str(self.directory / MANIFEST))  # numpy-only module
        self.vocab_size = model.input_vocab_size
        self.max_context = min(max_context or 4096, model.max_position_embeddings)
        self.prefill_chunk = max(1, prefill_chunk)
        entry = self.manifest["entry"]
        self.weights = read_aligned_safetensors(self.directory / WEIGHTS)
        self.host = safe_open(str(self.directory / HOST), framework="numpy") if (self.directory / HOST).is_file() else None
        self.caches: dict[str, np.ndarray] = {}
        for slot in entry["caches"]:
            info = self.manifest["kv_slots"][slot]
            rows = (info["window"] + self.prefill_chunk - 1) if info["ring"] else self.max_context
            self.caches[slot] = aligned_empty((rows, info["kv_heads"], info["head_dim"]), np.float32)
        # weights and ring buffers never move: their DLPack wrappers are made once; a full cache is
        # passed as its first P+T rows, so attention reads only the positions that exist
        self._weights = [tvm_ffi.from_dlpack(self.weights[n]) for n in entry["weights"]]
        self._rings = {s: tvm_ffi.from_dlpack(c) for s, c in self.caches.items()
                       if self.manifest["kv_slots"][s]["ring"]}
        self._functions = {name: self.vm[name] for name in self.manifest["programs"]}
        self._ple = entry["inputs"][2:] == ["ple_rows"]
        self.reset()

    # -- Session API -------------------------------------------------------------------------------
    def reset(self) -> None:
        for cache in self.caches.values():
            cache.fill(0)
        self.position = 0

    def _run(self, name: str, ids: np.ndarray) -> np.ndarray:
        length = self.position + ids.size
        inputs = [aligned(np.ascontiguousarray(ids, dtype=np.int64)),
                  aligned(np.arange(self.position, length, dtype=np.int64))]
        if self._ple:
            inputs.append(self._ple_rows(ids))
        caches = [self._rings[s] if s in self._rings else self._ffi.from_dlpack(c[:length])
                  for s, c in self.caches.items()]
        result = self._functions[name](*[self._ffi.from_dlpack(a) for a in inputs], *self._weights, *caches)
        self.position = length
        return np.array(np.from_dlpack(result[0]), dtype=np.float32)  # copy out of the VM's memory pool

    def _ple_rows(self, ids: np.ndarray) -> np.ndarray:
        """Per-layer-embedding rows of these tokens, read from the memory-mapped host table."""
        (table,) = self.manifest["host_tables"]
        view = self.host.get_slice(table)
        return aligned(np.concatenate([view[int(i): int(i) + 1] for i in ids]).astype(np.float32))


def load(directory: str | Path, max_context: int | None = None, prefill_chunk: int = 64) -> Session:
    """Open a compiled artifact: `g4c.load(DIR).generate([2, 17, 99], 16)`. Vulkan artifacts run
    through wgpu (`g4c.runtime.wgpu_session`), the others through the Relax VM."""
    if read_manifest(directory, check_files=False).get("runtime") == "wgpu":
        from g4c.runtime.wgpu_session import WgpuSession

        return WgpuSession(directory, max_context, prefill_chunk)
    return CompiledSession(directory, max_context, prefill_chunk)
