"""Gemma 4 weights: the expected tensor set, lazy safetensors checkpoints, and seeded random weights.

Canonical names are transformers' names below the text model, without prefix
(`layers.3.self_attn.q_proj.weight`, `embed_tokens.weight`); the untied LM head is `lm_head.weight`.
Checkpoints store them under `model.` (text-only `Gemma4ForCausalLM`) or `model.language_model.`
(multimodal `Gemma4ForConditionalGeneration`, whose vision/audio towers are ignored here).

Tensors are read lazily, one at a time, from memory-mapped safetensors files (single file or sharded
with `model.safetensors.index.json`), so inspecting or compiling never loads the whole model.
"""

from __future__ import annotations

import json
import os
import stat
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np
from safetensors import safe_open

from g4c.config import ModelConfig
from g4c.dtypes import canonical_dtype, numpy_dtype
from g4c.errors import WeightError

TEXT_PREFIXES = ("model.language_model.", "model.")
INDEX_FILE = "model.safetensors.index.json"
# K/V tensors that KV-shared layers may carry in a checkpoint but never use (transformers ignores them).
SHARED_LAYER_IGNORED = ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_norm.weight",
                        "self_attn.v_norm.weight")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the text decoder reads, with the shape transformers stores it in."""
    H, L, P = cfg.hidden_size, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (cfg.vocab_size, H), "norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, H)
    if cfg.has_ple:
        shapes["embed_tokens_per_layer.weight"] = (cfg.vocab_size_per_layer_input, L * P)
        shapes["per_layer_model_projection.weight"] = (L * P, H)
        shapes["per_layer_projection_norm.weight"] = (P,)
    for spec in cfg.layers:
        shapes.update(_layer_shapes(cfg, spec.index))
    return shapes


def _layer_shapes(cfg: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    spec = cfg.layers[i]
    H, nh, hd, kv, I = cfg.hidden_size, cfg.num_attention_heads, spec.head_dim, spec.num_kv_heads, spec.mlp_intermediate
    s = {f"{n}.weight": (H,) for n in ("input_layernorm", "post_attention_layernorm",
                                          "pre_feedforward_layernorm", "post_feedforward_layernorm")}
    s["layer_scalar"] = (1,)
    s["self_attn.q_proj.weight"] = (nh * hd, H)
    s["self_attn.q_norm.weight"] = (hd,)
    s["self_attn.o_proj.weight"] = (H, nh * hd)
    if spec.kv_mode != "reuse":
        s["self_attn.k_proj.weight"] = (kv * hd, H)
        s["self_attn.k_norm.weight"] = (hd,)
        if not spec.k_eq_v:
            s["self_attn.v_proj.weight"] = (kv * hd, H)
    s["mlp.gate_proj.weight"] = (I, H)
    s["mlp.up_proj.weight"] = (I, H)
    s["mlp.down_proj.weight"] = (H, I)
    if cfg.has_ple:
        P = cfg.hidden_size_per_layer_input
        s["per_layer_input_gate.weight"] = (P, H)
        s["per_layer_projection.weight"] = (H, P)
        s["post_per_layer_input_norm.weight"] = (H,)
    if cfg.enable_moe_block:
        E, Im = cfg.num_experts, cfg.moe_intermediate_size
        s["router.proj.weight"] = (E, H)
        s["router.scale"] = (H,)
        s["router.per_expert_scale"] = (E,)
        s["experts.gate_up_proj"] = (E, 2 * Im, H)
        s["experts.down_proj"] = (E, H, Im)
        for n in ("post_feedforward_layernorm_1", "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2"):
            s[f"{n}.weight"] = (H,)
    return {f"layers.{i}.{k}": v for k, v in s.items()}


class WeightSource(Protocol):
    """Where tensors come from: a checkpoint on disk or seeded random numbers."""

    def names(self) -> Iterable[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> str: ...

    def get(self, name: str) -> np.ndarray: ...


class Checkpoint:
    """A lazily read HF safetensors checkpoint directory (one file or an index of shards)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._files = self._safetensors_files()
        self._location: dict[str, tuple[Path, str]] = {}  # canonical name → (file, stored key)
        self._info: dict[str, tuple[tuple[int, ...], str]] = {}
        self._handles: dict[Path, object] = {}
        self.prefix = self._scan()

    def _safetensors_files(self) -> list[Path]:
        if not self.directory.is_dir():
            raise WeightError(f"checkpoint directory not found: {self.directory}")
        index = self.directory / INDEX_FILE
        if os.path.lexists(index):
            check_regular_file(index, "safetensors index")
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                shards = set(weight_map.values())
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise WeightError(f"{index}: not a valid safetensors index ({exc})") from None
            if not all(isinstance(f, str) and f for f in shards):
                raise WeightError(f"{index}: weight_map values must be shard file names")
            files = sorted(self.directory / f for f in shards)
            missing = [f for f in files if not os.path.lexists(f)]
            if missing:
                raise WeightError(f"{index} lists shard {missing[0].name}, which does not exist")
            return files
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise WeightError(f"no *.safetensors files in {self.directory}")
        return files

    def _open(self, path: Path):
        if path not in self._handles:
            check_regular_file(path, "weights file")
            try:
                self._handles[path] = safe_open(str(path), framework="numpy")
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise WeightError(f"{path}: unreadable safetensors file ({exc})") from None
        return self._handles[path]

    def _stored_tensors(self) -> tuple[dict[str, tuple[Path, tuple[int, ...], str]], str]:
        """Every stored key → (file, shape, safetensors dtype code), and the text model's key prefix."""
        stored: dict[str, tuple[Path, tuple[int, ...], str]] = {}
        for path in self._files:
            handle = self._open(path)
            for key in handle.keys():
                view = handle.get_slice(key)
                stored[key] = (path, tuple(view.get_shape()), view.get_dtype())
        return stored, next((p for p in TEXT_PREFIXES if any(k.startswith(p) for k in stored)), "")

    def _scan(self) -> str:
        stored, self.prefix = self._stored_tensors()
        for key, (path, shape, code) in stored.items():
            name = self._keep(key)
            if name is None:
                continue  # vision/audio towers and other non-text tensors of a multimodal checkpoint
            self._location[name] = (path, key)
            self._info[name] = (shape, _st_dtype(code, key))
        return self.prefix

    def _keep(self, key: str) -> str | None:
        """The canonical name of a stored key, None for tensors this source does not serve."""
        if key == "lm_head.weight":
            return key
        return key[len(self.prefix):] if key.startswith(self.prefix) else None

    def names(self) -> list[str]:
        return list(self._location)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][0]

    def dtype(self, name: str) -> str:
        return self._info[name][1]

    def get(self, name: str) -> np.ndarray:
        path, key = self._location[name]
        return self._open(path).get_tensor(key)

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Only the requested rows, read from the memory-mapped file (e.g. PLE rows per token)."""
        path, key = self._location[name]
        view = self._open(path).get_slice(key)
        return np.concatenate([view[int(i): int(i) + 1] for i in ids], axis=0)


class TowerCheckpoint(Checkpoint):
    """The tensors of a multimodal checkpoint's encoder towers, lazily read like `Checkpoint`: stored
    as `model.<tower>.…` (`model.vision_tower.…`, `model.embed_vision.…`, `model.audio_tower.…`,
    `model.embed_audio.…`), named `<tower>.…` here."""

    def __init__(self, directory: str | Path, towers: tuple[str, ...]):
        self.towers = tuple(f"{t}." for t in towers)
        super().__init__(directory)

    def _keep(self, key: str) -> str | None:
        name = key[len("model."):] if key.startswith("model.") else None
        return name if name is not None and name.startswith(self.towers) else None


def check_regular_file(path: Path, what: str) -> None:
    """Refuse, in one line, a `what` that cannot be read as a file before anything opens it: a FIFO,
    socket or device (reading one blocks or never ends), a directory, a dangling link, or a file this
    process may not read (safetensors reports permission errors as "No such file or directory")."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise WeightError(f"{path}: no such file (a {what} is expected there)") from None
    except PermissionError:
        raise WeightError(f"{path}: permission denied (cannot read the {what})") from None
    except OSError as exc:
        raise WeightError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise WeightError(f"{path}: not a regular file ({_file_kind(mode)}); a {what} must be a regular file")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise WeightError(f"{path}: permission denied (cannot read the {what})") from None
    except OSError as exc:
        raise WeightError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def _st_dtype(code: str, key: str) -> str:
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
    if code not in names:
        raise WeightError(f"tensor {key}: unsupported dtype {code} (expected F32, F16 or BF16)")
    return names[code]


class RandomWeights:
    """Seeded random weights for a config: tensor `name` depends only on (seed, name), so any subset
    can be regenerated lazily and identically (presets, benchmarks, `g4c init-random`).

    Matrices ~ uniform with std 0.02; norm scales, `layer_scalar`, router scales ~ 1 + U(-0.25, 0.25)
    so that tests see non-trivial values everywhere."""

    def __init__(self, cfg: ModelConfig, seed: int = 0, dtype: str = "float32"):
        self.cfg, self.seed, self._dtype = cfg, seed, canonical_dtype(dtype)
        self._shapes = expected_shapes(cfg)

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> str:
        return self._dtype

    def get(self, name: str) -> np.ndarray:
        return random_tensor(self._shapes[name], self.seed, name, numpy_dtype(self._dtype))


def random_tensor(shape: tuple[int, ...], seed: int, name: str, dtype) -> np.ndarray:
    """The seeded random tensor `name` (see `RandomWeights`): vectors ~ 1 + U(-0.25, 0.25), the rest
    uniform with std 0.02."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    values = rng.random(size=shape, dtype=np.float32)  # uniform: 3x faster than normal for big tables
    values -= np.float32(0.5)
    if len(shape) == 1:
        values *= np.float32(0.5)
        values += np.float32(1.0)
    else:
        values *= np.float32(2 * 0.02 * 3**0.5)  # std 0.02
    return values.astype(dtype, copy=False)


class Weights:
    """Validated weights for a config: every expected tensor present, nothing unexpected, shapes right.

    `get(name)` returns the stored array; `f32(name)` a cached float32 copy for the interpreter."""

    def __init__(self, cfg: ModelConfig, source: WeightSource):
        self.cfg, self.source = cfg, source
        self.shapes = expected_shapes(cfg)
        self._f32: dict[str, np.ndarray] = {}
        self.media = None  # a multimodal checkpoint's encoders (g4c.multimodal.MediaModel)
        validate(cfg, source)

    def attach_media(self, media) -> None:
        """Add a multimodal checkpoint's encoders: their tensors are served beside the text model's
        (`source`), and `media` says how to build and use them."""
        self.media = media
        self.source = _Union(self.source, media.source)

    def get(self, name: str) -> np.ndarray:
        return self.source.get(name)

    def f32(self, name: str) -> np.ndarray:
        if name not in self._f32:
            self._f32[name] = np.ascontiguousarray(self.source.get(name), dtype=np.float32)
        return self._f32[name]

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """float32 rows `ids` of a table without loading it whole when the source can (checkpoints)."""
        if name in self._f32:
            return self._f32[name][ids]
        fetch = getattr(self.source, "rows", None)
        rows = fetch(name, ids) if fetch else self.source.get(name)[ids]
        return np.asarray(rows, dtype=np.float32)

    def dtype(self) -> str:
        """The storage dtype of the embedding table (the checkpoint's working dtype)."""
        return self.source.dtype("embed_tokens.weight")


class _Union:
    """Two weight sources with disjoint names as one (the text model and its encoder towers)."""

    def __init__(self, first: WeightSource, second: WeightSource):
        self.first, self.second = first, second
        self._second = set(second.names())

    def _of(self, name: str) -> WeightSource:
        return self.second if name in self._second else self.first

    def names(self) -> list[str]:
        return list(self.first.names()) + list(self.second.names())

    def shape(self, name: str) -> tuple[int, ...]:
        return self._of(name).shape(name)

    def dtype(self, name: str) -> str:
        return self._of(name).dtype(name)

    def get(self, name: str) -> np.ndarray:
        return self._of(name).get(name)

    def __getattr__(self, attr: str):  # rows(), native blocks, ... of the text model's source
        return getattr(self.first, attr)


def validate(cfg: ModelConfig, source: WeightSource) -> None:
    """Raise one clear `WeightError` for missing, unexpected or mis-shaped tensors."""
    expected = expected_shapes(cfg)
    present = set(source.names())
    missing = [n for n in expected if n not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightError(f"missing tensor {missing[0]} (expected shape {list(expected[missing[0]])}){more}")
    for name in expected:
        if tuple(source.shape(name)) != expected[name]:
            raise WeightError(f"tensor {name} has shape {list(source.shape(name))} but the config expects "
                              f"{list(expected[name])}")
    unexpected = sorted(n for n in present - set(expected) if not _ignorable(cfg, n))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise WeightError(f"unexpected tensor {unexpected[0]} with shape {list(source.shape(unexpected[0]))}: "
                          f"the config has no such parameter{more}")


def _ignorable(cfg: ModelConfig, name: str) -> bool:
    """Tensors transformers also ignores: K/V of KV-shared layers, a tied LM head's copy."""
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
        return True
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit():
        index = int(parts[1])
        return index < cfg.num_hidden_layers and cfg.layers[index].kv_mode == "reuse" and parts[2] in SHARED_LAYER_IGNORED
    return False


__all__ = ["Checkpoint", "RandomWeights", "TowerCheckpoint", "Weights", "check_regular_file", "expected_shapes", "validate"]
