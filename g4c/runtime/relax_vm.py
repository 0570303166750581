"""The Relax VM executor: runs an artifact's `kernels.so` (or the library its manifest names) with
`tvm_ffi` and the TVM runtime libraries only — no compiler, no `tvm` import.

On the CPU the weights and KV caches are numpy buffers the kernels use (and update) in place; on a
GPU they are device tensors from the TVM runtime's allocator (`DeviceMemory`). `runtime_memory=True`
uses runtime tensors on the CPU too (the GPU code path, testable without a GPU). A static decode
(CUDA graphs) gets the same input tensors on every step.
"""

from __future__ import annotations

import ctypes
import platform
import sys
from pathlib import Path

import numpy as np

from g4c.artifact import ArtifactError, Manifest, aligned_empty
from g4c.artifact.libraries import find_runtime_library

DEVICE_CPU = 1  # DLPack device type
POOLED_ALLOCATOR = 2  # Relax VM allocator kind


def _loaded_libraries() -> set[str]:
    """File names of the shared libraries this process has mapped (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as maps:
            return {Path(line.split()[-1]).name for line in maps if line.rstrip().endswith((".so", ".dylib"))
                    or ".so." in line}
    except OSError:
        return set()


def load_runtime_libraries(directory: Path, names: list[str]) -> None:
    """Load the TVM runtime libraries an artifact needs (the CPU thread pool; a GPU's module loader)
    without importing the compiler. A library this process has already loaded (from an imported TVM)
    is not loaded a second time from the artifact: two copies of the runtime abort on their duplicate
    registrations."""
    loaded = _loaded_libraries()
    for name in names:
        if name in loaded:
            continue
        found = find_runtime_library(name, directory)
        if found is None:
            raise ArtifactError(f"{name} not found: install apache-tvm, compile with --bundle-runtime, "
                                "or set G4C_TVM_RUNTIME")
        try:
            ctypes.CDLL(str(found), mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            raise ArtifactError(f"cannot load {found}: {exc}") from None


def import_tvm_ffi():
    """`tvm_ffi`, imported without torch unless this process already uses torch: tvm_ffi imports torch
    whenever it is installed (for torch tensor interop, which the runtime never uses), and that costs
    ~140 MiB of resident memory on a runtime whose memory budget is its weights."""
    if "tvm_ffi" in sys.modules or "torch" in sys.modules:
        import tvm_ffi

        return tvm_ffi
    sys.modules["torch"] = None  # `import torch` raises ImportError while tvm_ffi initialises
    try:
        import tvm_ffi
    finally:
        del sys.modules["torch"]
    return tvm_ffi


def check_machine(manifest: Manifest) -> None:
    """An artifact's kernels are machine code for its target: say so instead of failing in dlopen."""
    here_system, here = platform.system(), platform.machine().lower()
    if manifest.system and here_system != manifest.system:
        hint = f": {manifest.prepare}, and run it there" if manifest.prepare else ""
        raise ArtifactError(f"artifact was compiled for {manifest.target} ({manifest.platform or manifest.system}){hint}")
    if manifest.machines and here not in manifest.machines:
        raise ArtifactError(f"artifact was compiled for {manifest.target} ({manifest.machines[0]}); this machine "
                            f"is {here}")


class RelaxVMExecutor:
    def __init__(self, session, runtime_memory: bool = False):
        tvm_ffi = import_tvm_ffi()
        directory, manifest = session.directory, session.manifest
        check_machine(manifest)
        load_runtime_libraries(directory, manifest.runtime_libraries)
        self._ffi, self.manifest = tvm_ffi, manifest
        on_device = manifest.device_type != DEVICE_CPU or runtime_memory
        self.memory = DeviceMemory(tvm_ffi, manifest.device) if on_device else None
        library = directory / manifest.library
        if not library.is_file():
            hint = f": {manifest.prepare}" if manifest.prepare else ""
            raise ArtifactError(f"{library} is missing{hint}")
        try:
            self.vm = tvm_ffi.load_module(str(library))["vm_load_executable"]()
            if on_device:  # the kernels' device, then the host
                self.vm["vm_initialization"](manifest.device_type, 0, POOLED_ALLOCATOR, DEVICE_CPU, 0,
                                             POOLED_ALLOCATOR)
            else:
                self.vm["vm_initialization"](DEVICE_CPU, 0, POOLED_ALLOCATOR)
        except Exception as exc:  # noqa: BLE001 - surfaced as one line
            raise ArtifactError(f"cannot load the compiled model: {exc}") from None
        self._functions = {name: self.vm[name] for name in manifest.programs}
        self._fixed: list | None = None  # static decode: the input tensors every step reuses

    def upload_weights(self, weights: list[np.ndarray]) -> None:
        if self.memory:
            self._weights = [self.memory.upload(w) for w in weights]
        else:  # the numpy buffers themselves (kept alive here), used in place
            self._host_weights = weights
            self._weights = [self._ffi.from_dlpack(w) for w in weights]

    def allocate_caches(self, shapes: dict[str, tuple[int, int, int]]) -> None:
        self.host_caches = {s: aligned_empty(shape, np.float32) for s, shape in shapes.items()}
        if self.memory:  # in device memory; the host copies only serve reset
            self._caches = {s: self.memory.upload(c) for s, c in self.host_caches.items()}
            self.host_caches = {}
        else:
            self._caches = {s: self._ffi.from_dlpack(c) for s, c in self.host_caches.items()}

    def clear_caches(self) -> None:
        for slot, cache in self._caches.items():
            if self.memory:
                self.memory.zero(cache)
            else:
                self.host_caches[slot].fill(0)

    def run(self, program: str, inputs: list[np.ndarray], cache_rows: dict[str, int]) -> np.ndarray:
        if program == "decode" and self.manifest.static_decode:  # the same tensors every step (a CUDA graph replays)
            tensors = self._fixed_inputs(inputs)
        else:
            tensors = [self.memory.upload(a) if self.memory else self._ffi.from_dlpack(a) for a in inputs]
        caches = [self._rows(slot, rows) for slot, rows in cache_rows.items()]
        result = self._functions[program](*tensors, *self._weights, *caches)
        if self.memory:
            return self.memory.download(result[0])
        return np.array(np.from_dlpack(result[0]), dtype=np.float32)  # copy out of the VM's memory pool

    def _rows(self, slot: str, rows: int):
        cache = self._caches[slot]
        if rows == cache.shape[0]:
            return cache
        if self.memory:
            return self.memory.view(cache, (rows, *cache.shape[1:]))
        return self._ffi.from_dlpack(self.host_caches[slot][:rows])

    def _fixed_inputs(self, arrays: list[np.ndarray]) -> list:
        """A static decode step's inputs (ids, position, PLE rows), written into tensors made at the
        first step: the CUDA graph captured then reads these addresses on every replay, and the caches
        are passed whole for the same reason."""
        if self._fixed is None:
            if self.memory:
                self._fixed = [(None, self.memory.empty(a.shape, str(a.dtype))) for a in arrays]
            else:
                hosts = [aligned_empty(a.shape, a.dtype) for a in arrays]
                self._fixed = [(h, self._ffi.from_dlpack(h)) for h in hosts]
        for array, (host, tensor) in zip(arrays, self._fixed):
            if self.memory:
                self.memory.copy(self._ffi.from_dlpack(array), tensor)
            else:
                host[...] = array
        return [tensor for _, tensor in self._fixed]


class DeviceMemory:
    """Tensors in device memory through the TVM runtime's own allocator and copies (no compiler, no torch)."""

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

    def zero(self, tensor) -> None:
        self.copy(self.ffi.from_dlpack(np.zeros(tuple(tensor.shape), np.float32)), tensor)

    def download(self, tensor) -> np.ndarray:
        out = np.empty(tuple(tensor.shape), dtype=np.float32)
        self.copy(tensor, self.ffi.from_dlpack(out))
        return out

    def view(self, tensor, shape):
        return self.create_view(tensor, self.ffi.Shape(tuple(shape)), tensor.dtype, 0)
