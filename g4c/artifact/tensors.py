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
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64, "I32": np.int32,
                       "U32": np.uint32, "U8": np.uint8}
_SAFETENSORS_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
                      "uint32": "U32", "uint8": "U8"}


def read_aligned_safetensors(path: Path, mapped: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file in an ALIGNMENT-aligned buffer: with `mapped`, tensors that
    lie ALIGNMENT-aligned in the file (g4c writes them so) are views of a private copy-on-write
    mapping of it (no copy; pages are read as the kernels touch them), the others are read into
    their own buffer.

    safetensors' own loaders return unaligned copies, and realigning them costs a second copy of the
    largest tensor (the LM head of E2B); reading into place keeps peak memory at the weights' size.
    The layout (8-byte little-endian header length, JSON header with dtype/shape/data_offsets, then
    the byte buffer) is the documented safetensors format."""
    if not Path(path).is_file():  # a FIFO or device would block or never end
        raise ArtifactError(f"{path}: not a regular file")
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        header, start = _read_header(f, path, size)
        mapping = np.memmap(path, dtype=np.uint8, mode="c") if mapped and size else None
        tensors = {}
        for name, (dtype, shape, (begin, end)) in header.items():
            nbytes = tensor_bytes(shape, dtype)
            if end - begin != nbytes:
                raise ArtifactError(f"{path}: tensor {name} has {end - begin} bytes, its shape needs {nbytes}")
            if start + end > size:
                raise ArtifactError(f"{path}: truncated at tensor {name}")
            if mapping is not None and (start + begin) % ALIGNMENT == 0 and nbytes:
                tensors[name] = mapping[start + begin: start + end].view(dtype).reshape(shape)
                continue
            array = aligned_empty(shape, dtype)
            f.seek(start + begin)
            if f.readinto(memoryview(array.reshape(-1)).cast("B")) != array.nbytes:
                raise ArtifactError(f"{path}: truncated at tensor {name}")
            tensors[name] = array
    return tensors


MAX_HEADER = 100 << 20  # bytes; safetensors' own limit


def safetensors_layout(path: Path) -> tuple[dict[str, tuple[np.dtype, tuple, tuple[int, int]]], int]:
    """({name: (numpy dtype, shape, (begin, end))}, data start) of a safetensors file: where each tensor's
    bytes are (offsets relative to the data start), for readers that map the file (the C runtime)."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        return _read_header(f, path, size)


def _read_header(f, path: Path, size: int) -> tuple[dict, int]:
    """{name: (numpy dtype, shape, (begin, end))} of a safetensors file and where its data starts;
    every value checked before anything is allocated."""
    raw = f.read(8)
    length = int.from_bytes(raw, "little") if len(raw) == 8 else -1
    if not 0 < length <= min(MAX_HEADER, size - 8):
        raise ArtifactError(f"{path}: corrupt safetensors header (length {length} in a {size}-byte file)")
    try:
        header = json.loads(f.read(length))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path}: corrupt safetensors header (not an object)")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            valid = (isinstance(shape, list) and all(isinstance(d, int) and 0 <= d < 2**40 for d in shape)
                     and isinstance(offsets, list) and len(offsets) == 2
                     and all(isinstance(o, int) and 0 <= o for o in offsets) and offsets[0] <= offsets[1])
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"{path}: tensor {name}: corrupt header entry ({exc})") from None
        if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
            raise ArtifactError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        if not valid:
            raise ArtifactError(f"{path}: tensor {name}: corrupt shape or offsets")
        tensors[name] = (np.dtype(_SAFETENSORS_DTYPES[dtype]), tuple(shape), tuple(offsets))
    return tensors, 8 + length


def write_safetensors(path: Path, specs: dict[str, tuple[tuple[int, ...], np.dtype]],
                      produce: Callable[[str], np.ndarray], progress: Callable[[int, int], None] | None = None) -> None:
    """A safetensors file written tensor by tensor: the header from `specs` (name → shape, dtype),
    then each `produce(name)`'s bytes, so one tensor at a time is in memory (safetensors' own
    writer serialises every tensor into one buffer first: twice the weights' size at peak, which a
    full-size fp32 model does not fit in). Same documented layout `read_aligned_safetensors` reads."""
    from g4c.dtypes import dtype_name

    # tensors whose size is a multiple of ALIGNMENT first: from a data section that starts ALIGNMENT-aligned
    # in the file, each of them is aligned where the file is mapped, so runtimes use it in place
    names = sorted(specs, key=lambda n: (tensor_bytes(*specs[n]) % ALIGNMENT != 0, n))
    header, offset = {}, 0
    for name in names:
        shape, dtype = specs[name]
        size = tensor_bytes(shape, dtype)
        header[name] = {"dtype": _SAFETENSORS_NAMES[dtype_name(dtype)], "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % ALIGNMENT)  # the data starts ALIGNMENT-aligned (safetensors asks for 8)
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
