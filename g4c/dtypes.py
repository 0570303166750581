"""Weight/activation dtypes: names, numpy types (bf16 via ml_dtypes) and rounding of constants."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from g4c.errors import G4CError

NUMPY_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
# Bytes per element of every dtype that appears in weights, activations or the KV cache.
DTYPE_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4}
ALIASES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16", "half": "float16",
           "bf16": "bfloat16"}


def canonical_dtype(name: str) -> str:
    """'bf16' → 'bfloat16' etc.; unknown names are a user error."""
    name = ALIASES.get(str(name).lower(), str(name).lower())
    if name not in NUMPY_DTYPES:
        raise G4CError(f"unsupported dtype {name!r}: use float32, float16 or bfloat16")
    return name


def numpy_dtype(name: str) -> np.dtype:
    return NUMPY_DTYPES[canonical_dtype(name)]


def dtype_name(dtype: np.dtype) -> str:
    for name, np_dtype in NUMPY_DTYPES.items():
        if np.dtype(dtype) == np_dtype:
            return name
    return np.dtype(dtype).name


def round_to_dtype(value: float, dtype: str) -> float:
    """A Python float rounded through `dtype` (e.g. sqrt(1536) in bf16 is 39.25, not 39.19)."""
    return float(np.asarray(value, dtype=np.float32).astype(numpy_dtype(dtype)).astype(np.float32))
