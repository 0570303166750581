"""Reading the CUDA module inside an exported g4c library (tests of the CUDA target, without a GPU)."""

from __future__ import annotations

import struct

FATBIN_MAGIC = bytes.fromhex("50ed55ba")  # fatbin header 0xBA55ED50, little-endian


def cuda_module(library: bytes) -> tuple[bytes, bytes]:
    """(format, data) of the serialised CUDA module inside an exported library."""
    at = library.find(struct.pack("<Q", 4) + b"cuda")
    while at >= 0:
        size = struct.unpack_from("<Q", library, at + 12)[0]
        fmt_len = struct.unpack_from("<Q", library, at + 20)[0]
        if fmt_len < 16:
            return library[at + 28: at + 28 + fmt_len], library[at + 20: at + 20 + size]
        at = library.find(struct.pack("<Q", 4) + b"cuda", at + 1)
    raise AssertionError("no CUDA module in the library")
