"""Write HF-format checkpoints (config.json + safetensors) that transformers itself can load.

Used by `g4c init-random`: seeded random weights for any preset or config, written shard by shard
into a temporary directory that is renamed into place only when complete (a failure leaves nothing).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from safetensors.numpy import save_file

from g4c.atomic import atomic_directory
from g4c.config import ModelConfig
from g4c.dtypes import DTYPE_BYTES
from g4c.errors import G4CError
from g4c.weights import INDEX_FILE, RandomWeights, WeightSource

DEFAULT_SHARD_BYTES = 2 * 1024**3


def stored_key(name: str) -> str:
    """Canonical name → key in a text-only checkpoint (`lm_head.weight` lives outside `model.`)."""
    return name if name == "lm_head.weight" else f"model.{name}"


def _shards(source: WeightSource, names: list[str], shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = _nbytes(source, name)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _nbytes(source: WeightSource, name: str) -> int:
    count = 1
    for d in source.shape(name):
        count *= d
    return count * DTYPE_BYTES[source.dtype(name)]


def check_resources(source: WeightSource, names: list[str], out: Path) -> None:
    """Refuse up front a checkpoint this machine cannot write, instead of failing after minutes with a
    MemoryError or a full disk: its largest tensor, made as float32 before it is stored, must fit in
    the machine's physical memory, and all its tensors on the disk that holds `out`."""
    if not names:
        return
    largest = max(names, key=lambda n: _nbytes(source, n) // DTYPE_BYTES[source.dtype(n)])
    largest_f32 = _nbytes(source, largest) // DTYPE_BYTES[source.dtype(largest)] * 4
    memory = _physical_memory()
    if memory is not None and largest_f32 > memory:
        raise G4CError(f"tensor {largest} {list(source.shape(largest))} alone needs {_gib(largest_f32)} of memory "
                       f"(float32) and this machine has {_gib(memory)}: the model is too large to write here")
    total = sum(_nbytes(source, n) for n in names)
    existing = next(p for p in [out, *out.parents] if p.exists())
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return
    if total > free:
        raise G4CError(f"the checkpoint needs {_gib(total)} on disk and {existing} has {_gib(free)} free")


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(nbytes: int) -> str:
    return f"{nbytes / 1024**3:,.1f} GiB" if nbytes >= 1024**3 else f"{nbytes / 1024**2:,.1f} MiB"


def write_checkpoint(cfg: ModelConfig, source: WeightSource, out_dir: str | Path,
                     shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                     progress: Callable[[int, int], None] | None = None) -> Path:
    """Write `cfg` + every tensor of `source` as an HF checkpoint at `out_dir` (atomically)."""
    out = Path(out_dir)
    names = list(source.names())
    check_resources(source, names, out.absolute())
    shards = _shards(source, names, shard_bytes)
    with atomic_directory(out, overwrite) as tmp:
        hf = cfg.to_hf_dict()
        hf["dtype"] = source.dtype(names[0])
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        weight_map: dict[str, str] = {}
        done = 0
        for k, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {stored_key(n): source.get(n) for n in shard}
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({key: fname for key in tensors})
            done += len(shard)
            if progress:
                progress(done, len(names))
        if len(shards) > 1:
            total = sum(_nbytes(source, n) for n in names)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return out


def write_random_checkpoint(cfg: ModelConfig, out_dir: str | Path, seed: int = 0, dtype: str = "float32",
                            **kwargs) -> Path:
    return write_checkpoint(cfg, RandomWeights(cfg, seed, dtype), out_dir, **kwargs)
