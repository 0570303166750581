"""Resolve a MODEL argument (a checkpoint directory or a preset name) into config + weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from g4c.artifact import MANIFEST
from g4c.config import ModelConfig, load_config
from g4c.errors import G4CError
from g4c.gguf_model import is_gguf
from g4c.presets import PRESETS, preset_config
from g4c.weights import Checkpoint, RandomWeights, Weights


@dataclass
class LoadedModel:
    name: str
    cfg: ModelConfig
    weights: Weights
    directory: Path | None = None  # checkpoint directory (holds tokenizer.json when there is one)


def model_config(model: str, num_layers: int | None = None) -> ModelConfig:
    """The config of MODEL (a checkpoint directory's config.json or a preset), cut to `num_layers`
    layers when given. Every command resolves MODEL here, so `--layers` is checked in one place:
    0 and negatives are refused like a count above the model's layers (`ModelConfig.with_layers`)."""
    if is_gguf(model):  # a llama.cpp GGUF file (g4c/gguf_model.py)
        from g4c.gguf_model import gguf_config

        cfg = gguf_config(model)
        return cfg if num_layers is None else cfg.with_layers(num_layers)
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            if (path / MANIFEST).is_file():
                raise G4CError(f"{model} is a compiled g4c artifact: this command needs a checkpoint directory "
                               "or a preset (artifacts run with g4c generate, logits and bench)")
            raise G4CError(f"{model} is neither a checkpoint (no config.json) nor a g4c artifact (no {MANIFEST})")
        cfg = load_config(path)
    elif model.lower() in PRESETS:
        cfg = preset_config(model)
    elif path.exists():
        raise G4CError(f"{model} is not a directory: MODEL must be a checkpoint directory or a preset name")
    else:
        raise G4CError(f"no checkpoint directory or preset named {model!r} (presets: {', '.join(PRESETS)})")
    return cfg if num_layers is None else cfg.with_layers(num_layers)


def load_model(model: str, random_weights: bool = False, seed: int = 0, num_layers: int | None = None,
               dtype: str = "float32") -> LoadedModel:
    """MODEL is a directory with config.json + *.safetensors (float or compressed-tensors int4/int8), a GGUF
    file, or a preset (needs `random_weights`)."""
    if is_gguf(model):
        return _load_gguf(model, random_weights, seed, num_layers, dtype)
    cfg = model_config(model, num_layers)
    path = Path(model)
    if path.is_dir():
        if random_weights:
            weights = Weights(cfg, RandomWeights(cfg, seed, dtype))
        elif num_layers is not None:
            raise G4CError("--layers only applies to presets or with --random-weights")
        else:
            weights = Weights(cfg, checkpoint_source(path))
        _attach_media(weights, path, cfg, seed if random_weights else None)
        return LoadedModel(path.name, cfg, weights, path)
    if not random_weights:
        raise G4CError(f"preset {model!r} has no weights here: add --random-weights (with --seed) or pass a "
                       "checkpoint directory")
    return LoadedModel(model.lower(), cfg, Weights(cfg, RandomWeights(cfg, seed, dtype)))


def _attach_media(weights: Weights, path: Path, cfg: ModelConfig, seed: int | None) -> None:
    """A multimodal checkpoint's encoders (g4c/multimodal.py), with seeded random tensors when `seed`."""
    from g4c.multimodal import load_media_model

    media = load_media_model(path, cfg, seed)
    if media is not None:
        weights.attach_media(media)


def checkpoint_source(path: Path):
    """The weight source of a checkpoint directory: plain safetensors (`Checkpoint`), or, when its
    config.json has a compressed-tensors `quantization_config`, a source whose int4/int8 tensors the
    compiler takes as stored (g4c/compressed_tensors.py). Other quantization methods are refused."""
    from g4c.compressed_tensors import QUANT_METHOD, CompressedTensorsCheckpoint, quantization_config

    qconfig = quantization_config(path)
    if qconfig is None:
        return Checkpoint(path)
    method = qconfig.get("quant_method")
    if method == QUANT_METHOD:
        return CompressedTensorsCheckpoint(path, qconfig)
    raise G4CError(f"{path / 'config.json'}: quantization_config.quant_method {method!r} is not supported (g4c "
                   f"reads float checkpoints, {QUANT_METHOD!r} int4/int8 checkpoints and GGUF files)")


def _load_gguf(model: str, random_weights: bool, seed: int, num_layers: int | None, dtype: str) -> LoadedModel:
    """A GGUF file: its config and tensors (g4c/gguf_model.py), with the rules of a checkpoint directory."""
    from g4c.gguf_model import load_gguf

    cfg, source = load_gguf(model)
    name = Path(model).name
    if random_weights:
        cfg = cfg if num_layers is None else cfg.with_layers(num_layers)
        return LoadedModel(name, cfg, Weights(cfg, RandomWeights(cfg, seed, dtype)))
    if num_layers is not None:
        raise G4CError("--layers only applies to presets or with --random-weights")
    return LoadedModel(name, cfg, Weights(cfg, source))  # directory None: a GGUF file carries no tokenizer.json
