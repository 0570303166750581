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
from collections.abc import Callable
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
DEVICE_CPU = 1  # DLPack device types
DEVICE_TYPES = {"cpu": DEVICE_CPU, "cuda": 2, "metal": 8}
POOLED_ALLOCATOR = 2  # Relax VM allocator kind


def tensor_bytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised numpy array whose data pointer is ALIGNMENT-byte aligned."""
    dtype = np.dtype(dtype)
    nbytes = tensor_bytes(shape, dtype)
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


_SAFETENSORS_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32"}


def write_safetensors(path: Path, specs: dict[str, tuple[tuple[int, ...], np.dtype]],
                      produce: Callable[[str], np.ndarray], progress: Callable[[int, int], None] | None = None) -> None:
    """A safetensors file written tensor by tensor: the header from `specs` (name → shape, dtype),
    then each `produce(name)`'s bytes, so one tensor at a time is in memory (safetensors' own
    writer serialises every tensor into one buffer first: twice the weights' size at peak, which a
    full-size fp32 model does not fit in). Same documented layout `read_aligned_safetensors` reads."""
    from g4c.dtypes import dtype_name

    names, header, offset = sorted(specs), {}, 0
    for name in names:
        shape, dtype = specs[name]
        size = tensor_bytes(shape, dtype)
        header[name] = {"dtype": _SAFETENSORS_NAMES[dtype_name(dtype)], "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for i, name in enumerate(names):
            shape, dtype = specs[name]
            array = np.ascontiguousarray(produce(name)).astype(dtype, copy=False)
            if array.shape != tuple(shape):
                raise ArtifactError(f"tensor {name} has shape {list(array.shape)}, its header says {list(shape)}")
            f.write(memoryview(array.reshape(-1).view(np.uint8)))
            del array
            if progress:
                progress(i + 1, len(names))


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


RUNTIME_LIBRARIES = {"cpu": ["libtvm_runtime.so"],
                     "cuda": ["libtvm_runtime.so", "libcudart.so.13", "libtvm_runtime_cuda.so"],
                     "metal": ["libtvm_runtime.dylib"]}  # TVM's macOS wheel: Metal built in


def find_runtime_library(name: str, directory: Path | None = None) -> Path | None:
    """A TVM runtime library (or libcudart): $G4C_TVM_RUNTIME's folder, the artifact `directory`
    (--bundle-runtime), an installed TVM wheel, the nvidia-cuda-runtime wheel, the CUDA toolkit."""
    import sys

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


def _load_runtime_library(directory: Path, device: str = "cpu") -> None:
    """Load the TVM runtime libraries an artifact needs (the CPU thread pool; the CUDA module loader)
    without importing the compiler."""
    for name in RUNTIME_LIBRARIES[device]:
        found = find_runtime_library(name, directory)
        if found is None:
            raise ArtifactError(f"{name} not found: install apache-tvm, compile with --bundle-runtime, "
                                "or set G4C_TVM_RUNTIME")
        try:
            ctypes.CDLL(str(found), mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            raise ArtifactError(f"cannot load {found}: {exc}") from None


def _check_machine(manifest: dict) -> None:
    """An artifact's kernels are machine code for its target's CPU: say so instead of failing in dlopen."""
    import platform

    if manifest.get("device") == "metal" and platform.system() != "Darwin":
        raise ArtifactError(f"artifact was compiled for {manifest['target']} (macOS, Metal): run link.sh in it on "
                            "the Mac first, and run it there")
    wanted = "aarch64" if manifest.get("target", "").startswith("arm") else None
    here = platform.machine().lower()
    if wanted and here not in (wanted, "arm64"):
        raise ArtifactError(f"artifact was compiled for {manifest['target']} ({wanted}); this machine is {here}")


class CompiledSession(Session):
    """Calls the artifact's Relax VM entry functions. On the CPU the weights and KV caches are numpy
    buffers the kernels use (and update) in place; on a GPU they are device tensors from the TVM
    runtime's allocator. `runtime_memory=True` uses runtime tensors on the CPU too (the GPU code path,
    testable without a GPU)."""

    def __init__(self, directory: str | Path, max_context: int | None = None, prefill_chunk: int = 64,
                 runtime_memory: bool = False):
        import tvm_ffi

        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        _check_machine(self.manifest)
        self._ffi = tvm_ffi
        self.device = self.manifest.get("device", "cpu")
        _load_runtime_library(self.directory, self.device)
        self._gpu = GpuMemory(tvm_ffi, self.device) if self.device != "cpu" or runtime_memory else None
        library = self.directory / self.manifest.get("library", LIBRARY)
        if not library.is_file():
            hint = ": run link.sh in it on the Mac first" if self.device == "metal" else ""
            raise ArtifactError(f"{library} is missing{hint}")
        try:
            self.vm = tvm_ffi.load_module(str(library))["vm_load_executable"]()
            if self._gpu:  # the kernels' device, then the host
                self.vm["vm_initialization"](DEVICE_TYPES[self.device], 0, POOLED_ALLOCATOR, DEVICE_CPU, 0,
                                             POOLED_ALLOCATOR)
            else:
                self.vm["vm_initialization"](DEVICE_CPU, 0, POOLED_ALLOCATOR)
        except Exception as exc:  # noqa: BLE001 - surfaced as one line
            raise ArtifactError(f"cannot load the compiled model: {exc}") from None
        self.config = self.manifest["config"]
        model = config_from_dict(self.config, source=str(self.directory / MANIFEST))  # numpy-only module
        self.vocab_size = model.input_vocab_size
        self.max_context = min(max_context or 4096, model.max_position_embeddings)
        self.prefill_chunk = max(1, prefill_chunk)
        entry = self.manifest["entry"]
        self.weights, self._host_tables = artifact_weights(self.directory, self.manifest, model)
        self.caches: dict[str, np.ndarray] = {}
        for slot in entry["caches"]:
            info = self.manifest["kv_slots"][slot]
            rows = (info["window"] + self.prefill_chunk - 1) if info["ring"] else self.max_context
            self.caches[slot] = aligned_empty((rows, info["kv_heads"], info["head_dim"]), np.float32)
        # weights and ring buffers never move: their DLPack wrappers are made once; a full cache is
        # passed as its first P+T rows, so attention reads only the positions that exist (a static
        # decode passes it whole: its shapes stay fixed, and the GPU kernels bound themselves by position)
        self._index = np.int32 if self.manifest.get("index_dtype") == "int32" else np.int64
        if self._gpu:  # weights and caches live in GPU memory; the host copies give way to shape stand-ins
            self._weights = [self._gpu.upload(self.weights[n]) for n in entry["weights"]]
            self.weights = {n: np.broadcast_to(np.zeros((), a.dtype), a.shape) for n, a in self.weights.items()}
            self._device_caches = {s: self._gpu.upload(c) for s, c in self.caches.items()}
        else:
            self._weights = [tvm_ffi.from_dlpack(self.weights[n]) for n in entry["weights"]]
            self._device_caches = {s: tvm_ffi.from_dlpack(c) for s, c in self.caches.items()}
        self._rings = {s: c for s, c in self._device_caches.items() if self.manifest["kv_slots"][s]["ring"]}
        self._functions = {name: self.vm[name] for name in self.manifest["programs"]}
        self._ple = entry["inputs"][2:] == ["ple_rows"]
        self._static_decode = bool(self.manifest.get("static_decode"))
        self._fixed: list | None = None  # static decode: the input tensors every step reuses
        self.reset()

    # -- Session API -------------------------------------------------------------------------------
    def reset(self) -> None:
        for slot, cache in self.caches.items():
            cache.fill(0)
            if self._gpu:
                self._gpu.copy(self._ffi.from_dlpack(cache), self._device_caches[slot])
        self.position = 0

    def _run(self, name: str, ids: np.ndarray) -> np.ndarray:
        length = self.position + ids.size
        inputs = [aligned(np.ascontiguousarray(ids, dtype=self._index)),
                  aligned(np.arange(self.position, length, dtype=self._index))]
        if self._ple:
            inputs.append(self._ple_rows(ids))
        if name == "decode" and self._static_decode:  # the same tensors every step (a CUDA graph replays)
            tensors, caches = self._fixed_inputs(inputs), list(self._device_caches.values())
        else:
            caches = [self._rings[s] if s in self._rings else self._first_rows(s, length) for s in self.caches]
            tensors = [self._gpu.upload(a) if self._gpu else self._ffi.from_dlpack(a) for a in inputs]
        result = self._functions[name](*tensors, *self._weights, *caches)
        self.position = length
        if self._gpu:
            return self._gpu.download(result[0])
        return np.array(np.from_dlpack(result[0]), dtype=np.float32)  # copy out of the VM's memory pool

    def _fixed_inputs(self, arrays: list[np.ndarray]) -> list:
        """A static decode step's inputs (ids, position, PLE rows), written into tensors made at the
        first step: the CUDA graph captured then reads these addresses on every replay, and the caches
        are passed whole for the same reason."""
        if self._fixed is None:
            if self._gpu:
                self._fixed = [(None, self._gpu.empty(a.shape, str(a.dtype))) for a in arrays]
            else:
                hosts = [aligned_empty(a.shape, a.dtype) for a in arrays]
                self._fixed = [(h, self._ffi.from_dlpack(h)) for h in hosts]
        for array, (host, tensor) in zip(arrays, self._fixed):
            if self._gpu:
                self._gpu.copy(self._ffi.from_dlpack(array), tensor)
            else:
                host[...] = array
        return [tensor for _, tensor in self._fixed]

    def _first_rows(self, slot: str, rows: int):
        if self._gpu:
            return self._gpu.view(self._device_caches[slot], (rows, *self.caches[slot].shape[1:]))
        return self._ffi.from_dlpack(self.caches[slot][:rows])

    def _ple_rows(self, ids: np.ndarray) -> np.ndarray:
        """Per-layer-embedding rows of these tokens, read from the host table (memory-mapped file)."""
        (table,) = self.manifest["host_tables"]
        view = self._host_tables[table]
        return aligned(np.concatenate([view[int(i): int(i) + 1] for i in ids]).astype(np.float32))


def artifact_weights(directory: Path, manifest: dict, model) -> tuple[dict[str, np.ndarray], dict]:
    """(weights as stored, {host table: row-sliceable}) of an artifact: read from its files (aligned;
    host tables memory-mapped), or regenerated from the seed for --weights-from-seed artifacts."""
    from safetensors import safe_open

    if manifest.get("weights_from_seed") is not None:
        return seeded_weights(manifest, model)
    weights = read_aligned_safetensors(directory / WEIGHTS)
    if not manifest["host_tables"]:
        return weights, {}
    host = safe_open(str(directory / HOST), framework="numpy")
    return weights, {t: host.get_slice(t) for t in manifest["host_tables"]}


def seeded_weights(manifest: dict, model) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The weights (as stored) and host tables of a `--weights-from-seed` artifact, regenerated from
    the seed exactly as the compiler made them (g4c.weights is numpy-only)."""
    from g4c.dtypes import numpy_dtype
    from g4c.weights import RandomWeights, derived_weight

    spec = manifest["weights_from_seed"]
    source = RandomWeights(model, spec["seed"], spec["dtype"])
    recipes, half = manifest["weight_recipes"], set(manifest["half_weights"])

    def stored(name: str, array: np.ndarray, dtype: str) -> np.ndarray:
        array = np.asarray(array, dtype=np.float32).astype(numpy_dtype(dtype))
        return aligned(array.view(np.uint16) if dtype == "bfloat16" else array)

    def base(name: str) -> np.ndarray:
        return source.get(name).astype(np.float32)

    weights = {n: stored(n, derived_weight(n, recipes, base), manifest["weight_dtype"] if n in half else "float32")
               for n in manifest["entry"]["weights"]}
    host = {t: base(t).astype(numpy_dtype(manifest["weight_dtype"])) for t in manifest["host_tables"]}
    return weights, host


class GpuMemory:
    """Tensors in GPU memory through the TVM runtime's own allocator and copies (no compiler, no torch)."""

    def __init__(self, tvm_ffi, device: str):
        self.ffi = tvm_ffi
        self.device = tvm_ffi.device(device, 0)
        self.alloc = tvm_ffi.get_global_func("runtime.TVMTensorAllocWithScope")
        self.copy = tvm_ffi.get_global_func("runtime.TVMTensorCopyFromTo")
        self.create_view = tvm_ffi.get_global_func("runtime.TVMTensorCreateView")

    def empty(self, shape, dtype: str):
        return self.alloc(self.ffi.Shape(tuple(shape)), self.ffi.dtype(dtype), self.device, "global")

    def upload(self, array: np.ndarray):
        tensor = self.empty(array.shape, str(array.dtype))
        self.copy(self.ffi.from_dlpack(np.ascontiguousarray(array)), tensor)
        return tensor

    def download(self, tensor) -> np.ndarray:
        out = np.empty(tuple(tensor.shape), dtype=np.float32)
        self.copy(tensor, self.ffi.from_dlpack(out))
        return out

    def view(self, tensor, shape):
        return self.create_view(tensor, self.ffi.Shape(tuple(shape)), tensor.dtype, 0)


def load(directory: str | Path, max_context: int | None = None, prefill_chunk: int = 64) -> Session:
    """Open a compiled artifact: `g4c.load(DIR).generate([2, 17, 99], 16)`. Vulkan artifacts run
    through wgpu (`g4c.runtime.wgpu_session`), the others through the Relax VM."""
    if read_manifest(directory, check_files=False).get("runtime") == "wgpu":
        from g4c.runtime.wgpu_session import WgpuSession

        return WgpuSession(directory, max_context, prefill_chunk)
    return CompiledSession(directory, max_context, prefill_chunk)
