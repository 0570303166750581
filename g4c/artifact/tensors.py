"""Tensor files of an artifact: aligned safetensors reading and streaming writing, file hashing.

Both sides of the format use these: the compiler writes `weights.safetensors` / `host.safetensors`
tensor by tensor, the runtimes read them into buffers the kernels may use in place. numpy only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from g4c.errors import G4CError

ALIGNMENT = 64  # TVM kernels assume 64-byte aligned buffers (aligned vector loads)


class ArtifactError(G4CError):
    """A missing, corrupt, modified or incompatible artifact."""


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


# safetensors dtype -> numpy storage; bf16 travels to the kernels as its uint16 bit pattern (DLPack from
# numpy has no bf16), which is also how the kernels read it
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64, "I32": np.int32}
_SAFETENSORS_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32"}


def read_aligned_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, read straight into its own ALIGNMENT-aligned buffer.

    safetensors' own loaders return unaligned copies, and realigning them costs a second copy of the
    largest tensor (the LM head of E2B); reading into place keeps peak memory at the weights' size.
    The layout (8-byte little-endian header length, JSON header with dtype/shape/data_offsets, then
    the byte buffer) is the documented safetensors format."""
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
