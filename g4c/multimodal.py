"""A multimodal checkpoint's encoders: what `Gemma4ForConditionalGeneration` adds to the text decoder.

`load_media_model(directory, text_cfg)` reads config.json's `vision_config` / `audio_config` and the
special token ids, the processor config (`g4c.media.ProcessorConfig`) and the towers' tensors
(`model.vision_tower.…`, `model.embed_vision.…`, `model.audio_tower.…`, `model.embed_audio.…`); a
text-only checkpoint gives None. `MediaModel.graphs()` builds the encoder graphs (`encode_image`:
`g4c.vision`, `encode_audio`: `g4c.audio`); `MediaModel.spec` is what a session needs to place their
outputs into a prompt (`g4c.runtime.media.MediaSpec`, stored in the artifact's manifest).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from g4c.config import ModelConfig
from g4c.errors import ConfigError, WeightError
from g4c.ir import Graph
from g4c.runtime.media import MediaSpec
from g4c.vision import VisionTowerConfig, build_vision_graph, vision_tower_shapes

ENCODERS = {"image": "encode_image", "audio": "encode_audio"}


@dataclass
class MediaModel:
    spec: MediaSpec
    vision: VisionTowerConfig | None
    audio: Any  # g4c.audio.AudioTowerConfig | None
    text_hidden: int
    source: Any  # a weight source of the tower tensors (names, shape, dtype, get)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = vision_tower_shapes(self.vision, self.text_hidden) if self.vision else {}
        if self.audio is not None:
            from g4c.audio import audio_tower_shapes

            shapes.update(audio_tower_shapes(self.audio, self.text_hidden))
        return shapes

    def graphs(self) -> dict[str, Graph]:
        """The encoder graphs, by program name (`encode_image`, `encode_audio`)."""
        out = {}
        if self.vision is not None:
            out[ENCODERS["image"]] = build_vision_graph(self.vision, self.text_hidden)
        if self.audio is not None:
            from g4c.audio import build_audio_graph

            out[ENCODERS["audio"]] = build_audio_graph(self.audio, self.text_hidden)
        return out

    def validate(self) -> None:
        """One clear error for a missing or mis-shaped tower tensor."""
        present = set(self.source.names())
        for name, shape in self.shapes().items():
            if name not in present:
                raise WeightError(f"missing tensor model.{name} of the {name.split('.')[0]} (expected shape {list(shape)})")
            if tuple(self.source.shape(name)) != shape:
                raise WeightError(f"tensor model.{name} has shape {list(self.source.shape(name))} but the config "
                                  f"expects {list(shape)}")


def read_raw_config(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / "config.json").read_text())


def has_towers(raw: dict[str, Any]) -> bool:
    return bool(raw.get("vision_config") or raw.get("audio_config"))


def media_spec(raw: dict[str, Any], text_cfg: ModelConfig, processor: dict[str, Any], towers: tuple[str, ...]) -> MediaSpec:
    from g4c.media import MediaTokens

    tokens = MediaTokens.from_config(raw)
    need = {"image": ("image", "boi", "eoi"), "audio": ("audio", "boa", "eoa")}
    for kind in towers:
        missing = [t for t in need[kind] if getattr(tokens, t) is None]
        if missing:
            raise ConfigError(f"config.json: the {kind} encoder needs the {missing[0]} token id")
    if text_cfg.pad_token_id is None:
        raise ConfigError("config.json: text_config.pad_token_id is needed for images and audio (transformers "
                          "embeds the pad token at soft-token positions)")
    ids = {t: getattr(tokens, t) for t in ("image", "boi", "eoi", "audio", "boa", "eoa")}
    return MediaSpec(processor, ids, int(text_cfg.pad_token_id),
                     text_cfg.use_bidirectional_attention == "vision", towers)


def load_media_model(directory: str | Path, text_cfg: ModelConfig, seed: int | None = None) -> MediaModel | None:
    """The encoders of the checkpoint in `directory` (None for a text-only checkpoint); `seed`: seeded
    random tower tensors instead of the checkpoint's (`--random-weights`)."""
    from g4c.media import ProcessorConfig
    from g4c.weights import TowerCheckpoint

    directory = Path(directory)
    raw = read_raw_config(directory)
    if not has_towers(raw):
        return None
    vision = VisionTowerConfig.from_dict(raw["vision_config"]) if raw.get("vision_config") else None
    audio = None
    if raw.get("audio_config"):
        from g4c.audio import AudioTowerConfig

        audio = AudioTowerConfig.from_dict(raw["audio_config"])
    towers = tuple(k for k, cfg in (("image", vision), ("audio", audio)) if cfg is not None)
    processor = ProcessorConfig.from_directory(directory)
    _check_processor(processor, towers, directory)
    prefixes = tuple(p for kind, p in (("image", ("vision_tower", "embed_vision")), ("audio", ("audio_tower", "embed_audio")))
                     if kind in towers for p in p)
    model = MediaModel(media_spec(raw, text_cfg, processor.to_dict(), towers), vision, audio,
                       text_cfg.hidden_size, None)
    model.source = RandomTowerWeights(model.shapes(), seed) if seed is not None else TowerCheckpoint(directory, prefixes)
    if audio is not None:  # transformers' ±inf clip bounds, finite (weights must be)
        from g4c.audio import FiniteClipBounds

        model.source = FiniteClipBounds(model.source)
    model.validate()
    return model


def _check_processor(processor, towers: tuple[str, ...], directory: Path) -> None:
    for kind, part in (("image", processor.image), ("audio", processor.audio)):
        if kind in towers and part is None:
            raise ConfigError(f"{directory}: the checkpoint has an {kind} encoder but no {kind} processor settings "
                              "(processor_config.json / preprocessor_config.json)")


class RandomTowerWeights:
    """Seeded random tower tensors (same law as `g4c.weights.RandomWeights`): benchmarks and presets.
    The clippable linears' bounds are left open (±inf, as transformers initialises them), so random
    weights are not clamped to a point."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int = 0):
        from g4c.weights import random_tensor

        self._shapes, self._seed, self._make = shapes, seed, random_tensor

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> str:
        return "float32"

    def get(self, name: str) -> np.ndarray:
        bound = name.rpartition(".")[2]
        if bound in ("input_min", "output_min", "input_max", "output_max"):
            return np.full(self._shapes[name], -np.inf if bound.endswith("min") else np.inf, np.float32)
        return self._make(self._shapes[name], self._seed, name, np.float32)
