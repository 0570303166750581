"""Resolve a MODEL argument (a checkpoint directory or a preset name) into config + weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from g4c.config import ModelConfig, load_config
from g4c.errors import G4CError
from g4c.presets import PRESETS, preset_config
from g4c.weights import Checkpoint, RandomWeights, Weights


@dataclass
class LoadedModel:
    name: str
    cfg: ModelConfig
    weights: Weights
    directory: Path | None = None  # checkpoint directory (holds tokenizer.json when there is one)


def load_model(model: str, random_weights: bool = False, seed: int = 0, num_layers: int | None = None,
               dtype: str = "float32") -> LoadedModel:
    """MODEL is a directory with config.json + *.safetensors, or a preset (needs `random_weights`)."""
    path = Path(model)
    if path.is_dir():
        if random_weights:
            cfg = load_config(path)
            cfg = cfg.with_layers(num_layers) if num_layers else cfg
            return LoadedModel(path.name, cfg, Weights(cfg, RandomWeights(cfg, seed, dtype)), path)
        if num_layers:
            raise G4CError("--layers only applies to presets or with --random-weights")
        cfg = load_config(path)
        return LoadedModel(path.name, cfg, Weights(cfg, Checkpoint(path)), path)
    if model.lower() in PRESETS:
        cfg = preset_config(model, num_layers)
        if not random_weights:
            raise G4CError(f"preset {model!r} has no weights here: add --random-weights (with --seed) or pass a "
                           "checkpoint directory")
        return LoadedModel(model.lower(), cfg, Weights(cfg, RandomWeights(cfg, seed, dtype)))
    if path.exists():
        raise G4CError(f"{model} is not a directory: MODEL must be a checkpoint directory or a preset name")
    raise G4CError(f"no checkpoint directory or preset named {model!r} (presets: {', '.join(PRESETS)})")
