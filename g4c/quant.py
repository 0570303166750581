"""Weight quantization: int8 (`q8`) and int4 (`q4`) with one scale per group of 32 along the reduction
axis — the blocks of llama.cpp's Q8_0 and Q4_0, so GGUF files of those types map onto the same kernels.

Why group 32: it is what Q4_0/Q8_0/MLC q4f16_1 use (the error of every engine users compare with is
measured at that granularity), it divides every Gemma 4 reduction width, and a group is a whole
number of 32-bit words (8 int4 or 4 int8 values per word), which WGSL needs (it has no 8-bit loads).

Layout of a [N, K] weight (K a multiple of 32), as bytes: per group of 32 values
- `q8`: 32 bytes, value e in byte e, two's complement; w = q · scale;
- `q4`: 16 bytes (Q4_0's): byte b (0..15) holds value b in its low nibble and value b + 16 in its high
  nibble; w = (q − 8) · scale.
The bytes are declared as `uint32` words ([N, K·bits/32]: WGSL has no 8-bit loads) or as `uint8`
([N, K·bits/8]: a CPU then loads 16 or 32 consecutive values as one vector) — the same bytes; the
target picks the word (`LoweringOptions.quant_word`).
- `scales` [N, K/32], fp16 values (Q4_0/Q8_0 store fp16 scales), stored as float16 (CPUs: 4.5 bits per q4
  weight) or float32 (GPU targets, whose shading languages may lack 16-bit loads) — the same values.

numpy only: the compiler writes quantized weights with it, tests dequantize with it.
"""

from __future__ import annotations

import numpy as np

GROUP = 32
SCHEMES = ("q8", "q4")  # kernels compute on these
HOST_SCHEMES = (*SCHEMES, "q3")  # host tables (the PLE table, dequantized by the runtime row by row) also q3
BITS = {"q8": 8, "q4": 4, "q3": 3}
WORDS = ("uint32", "uint8")
SCALE_DTYPES = ("float16", "float32")


def part_dtype(part: str, stored: str | None = None) -> str:
    """The storage dtype of one part of a quantized weight as its recipe names it (`[source, scheme,
    part, dtype]`): the data's word (uint32 when unnamed), the scales' float dtype (float32 when
    unnamed, or when a recipe of an older artifact named the data word there)."""
    if part == "data":
        return stored or "uint32"
    return stored if stored in SCALE_DTYPES else "float32"


def quant_scheme(name: str | None, host: bool = False) -> str | None:
    """A --quant value (q8, q4, or none/None: no quantization); `host`: a --quant-ple value, which may
    also be q3."""
    from g4c.errors import G4CError

    allowed = HOST_SCHEMES if host else SCHEMES
    if name in (None, "none"):
        return None
    if name not in allowed:
        only = " (q3 is for the PLE table only: --quant-ple q3)" if name in HOST_SCHEMES else ""
        raise G4CError(f"unknown quantization {name!r}: use {', '.join(allowed)} or none{only}")
    return name


def quantizable(shape: tuple[int, ...]) -> bool:
    """Whether a weight of this shape can be group-quantized along its last axis."""
    return len(shape) >= 2 and shape[-1] % GROUP == 0


def packed_shapes(shape: tuple[int, ...], scheme: str, word: str = "uint32") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(data shape, scales shape) of a quantized [..., K] weight, its data in `word`s."""
    *lead, k = shape
    return (*lead, k * BITS[scheme] // (8 * np.dtype(word).itemsize)), (*lead, k // GROUP)


def as_words(data: np.ndarray, word: str) -> np.ndarray:
    """Quantized data (any word) declared as `word`s: the same bytes, another last axis."""
    raw = np.ascontiguousarray(data).view(np.uint8)
    return raw.view(np.dtype(word).newbyteorder("<")).astype(word, copy=False)


CHUNK = 1 << 24  # weights quantized at a time: numpy's temporaries stay small next to a 9 GB PLE table


def quantize(weight: np.ndarray, scheme: str, word: str = "uint32") -> tuple[np.ndarray, np.ndarray]:
    """(data in `word`s, scales float32) of `weight` [..., K], round to nearest as llama.cpp does:
    q8: scale = max|w| / 127; q4: scale = m / −8 with m the value of largest magnitude (Q4_0).
    Rows are quantized CHUNK weights at a time, so the memory needed beyond the input is the output."""
    if scheme not in HOST_SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}")
    w = np.asarray(weight, dtype=np.float32)
    rows = w.reshape(-1, w.shape[-1])
    data = np.empty((rows.shape[0], rows.shape[1] * BITS[scheme] // 8), np.uint8)
    scales = np.empty((rows.shape[0], rows.shape[1] // GROUP), np.float32)
    step = max(1, CHUNK // max(1, rows.shape[1]))
    for lo in range(0, rows.shape[0], step):
        data[lo:lo + step], scales[lo:lo + step] = _quantize_rows(rows[lo:lo + step], scheme)
    return as_words(data.reshape(*w.shape[:-1], -1), word), scales.reshape(*w.shape[:-1], -1)


def _quantize_rows(w: np.ndarray, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """(data bytes, fp16-valued float32 scales) of rows w [R, K]."""
    groups = w.reshape(*w.shape[:-1], w.shape[-1] // GROUP, GROUP)
    if scheme == "q8":
        scale = np.abs(groups).max(axis=-1) / 127.0
        inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
        q = np.clip(np.round(groups * inv[..., None]), -127, 127).astype(np.int8)
        data = q.reshape(*w.shape[:-1], -1).view(np.uint8).reshape(*w.shape[:-1], -1, 4)
    elif scheme == "q4":
        index = np.abs(groups).argmax(axis=-1)[..., None]
        scale = np.take_along_axis(groups, index, axis=-1)[..., 0] / -8.0
        inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
        q = np.clip(np.floor(groups * inv[..., None] + 8.5), 0, 15).astype(np.uint8)  # Q4_0's rounding
        data = (q[..., :16] | (q[..., 16:] << 4)).reshape(*w.shape[:-1], -1, 4)  # 16 bytes per group
    else:  # q3: Q4_0's rule with 8 levels, scale = m / −4; value e in bits 3e..3e+2 of its group's 12 bytes
        index = np.abs(groups).argmax(axis=-1)[..., None]
        scale = np.take_along_axis(groups, index, axis=-1)[..., 0] / -4.0
        inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
        q = np.clip(np.floor(groups * inv[..., None] + 4.5), 0, 7).astype(np.uint8)
        bits = (q[..., None] >> np.arange(3, dtype=np.uint8)) & 1  # [..., 32, 3], least significant first
        data = np.packbits(bits.reshape(*q.shape[:-1], 96), axis=-1, bitorder="little")
    data = np.ascontiguousarray(data).reshape(*w.shape[:-1], -1).view(np.uint8)  # the bytes of each row
    # scales as Q4_0/Q8_0 store them: fp16 (the values are computed with the fp32 scale, as llama.cpp does)
    return data, scale.astype(np.float16).astype(np.float32)


def dequantize(data: np.ndarray, scales: np.ndarray, scheme: str) -> np.ndarray:
    """The float32 weight the kernels compute with."""
    raw = np.ascontiguousarray(data).view(np.uint8)  # bytes in memory order, whatever the word
    lead = data.shape[:-1]
    if scheme == "q8":
        q = raw.view(np.int8).astype(np.float32).reshape(*lead, -1, GROUP)
    elif scheme == "q4":
        b = raw.reshape(*lead, -1, 16)
        q = np.concatenate([b & 15, b >> 4], axis=-1).astype(np.float32) - 8.0
    elif scheme == "q3":
        bits = np.unpackbits(raw.reshape(*lead, -1, 12), axis=-1, bitorder="little").reshape(*lead, -1, GROUP, 3)
        q = (bits @ np.array([1, 2, 4], np.uint8)).astype(np.float32) - 4.0
    else:
        raise ValueError(f"unknown quantization {scheme!r}")
    return (q * scales[..., None]).reshape(*lead, -1).astype(np.float32)
