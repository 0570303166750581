"""Images and audio in a prompt, for every session (reference interpreter, compiled artifacts).

`MediaSpec` is what a model says about its media (the processor config, the special token ids, the
pad id its PLE reads at soft tokens, whether an image's soft tokens attend to each other); a session
that has one turns `prefill(ids, images=[...], audio=[...])` into:

1. preprocessing (`g4c.media`: transformers' image processor and audio feature extractor);
2. the prompt expanded as `Gemma4Processor` does (`boi + image × N + eoi`, `boa + audio × N + eoa`);
3. each image / clip encoded by its tower (`encode_image`, `encode_audio`: the encoder inputs are
   made here, `image_encoder_inputs` / `audio_encoder_inputs`);
4. a `MediaPrompt`: the ids with the pad token at soft positions, the soft rows, their mask and each
   token's `reach` (the last position it attends to), cut into prefill chunks that never split an
   image block (its tokens attend to the whole block, which must be in the cache when they run).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from g4c.errors import G4CError


@dataclass(frozen=True)
class MediaSpec:
    processor: dict[str, Any]  # g4c.media.ProcessorConfig.to_dict()
    tokens: dict[str, int | None]  # image, boi, eoi, audio, boa, eoa
    pad_token_id: int
    bidirectional_vision: bool  # text config use_bidirectional_attention == "vision"
    towers: tuple[str, ...]  # "image", "audio": the encoders the model has

    def to_json(self) -> dict:
        return {"processor": self.processor, "tokens": self.tokens, "pad_token_id": self.pad_token_id,
                "bidirectional_vision": self.bidirectional_vision, "towers": list(self.towers)}

    @classmethod
    def from_json(cls, data: dict) -> MediaSpec:
        return cls(dict(data["processor"]), dict(data["tokens"]), int(data["pad_token_id"]),
                   bool(data["bidirectional_vision"]), tuple(data["towers"]))


@dataclass
class MediaPrompt:
    ids: np.ndarray  # [T] int64, the pad token at soft positions
    soft: np.ndarray  # [T, H] float32, the encoders' rows at soft positions, 0 elsewhere
    soft_mask: np.ndarray  # [T] int64
    reach: np.ndarray  # [T] int64, relative to the prompt's first token
    image_blocks: list[tuple[int, int]]  # (start, length) of each image's soft tokens

    def chunks(self, size: int) -> list[tuple[int, int]]:
        """[start, end) prefill chunks of at most `size` tokens, except that an image block is never
        split: a chunk ends before a block that does not fit, and a block longer than `size` is a
        chunk of its own."""
        out, start, total = [], 0, self.ids.size
        while start < total:
            end = min(start + size, total)
            for b0, n in self.image_blocks:
                b1 = b0 + n
                if b0 < end < b1:  # the chunk would cut this block
                    end = b0 if b0 > start else b1
            out.append((start, end))
            start = end
        return out


def longest_image_block(spec: MediaSpec) -> int:
    """The most soft tokens one image can have (sizes the prefill chunk and the sliding rings)."""
    return int(spec.processor.get("image", {}).get("max_soft_tokens", 0)) if "image" in spec.towers else 0


def build_prompt(spec: MediaSpec, tokens: Sequence[int], images: Sequence, audio: Sequence,
                 encode: dict, hidden: int) -> MediaPrompt:
    """Preprocess, expand, encode and place the media of one prompt (see the module docstring).
    `encode[kind](inputs)` runs a tower on its encoder inputs and returns [S, hidden]."""
    from g4c import media as m

    cfg = m.ProcessorConfig.from_dict(spec.processor)
    tok = m.MediaTokens(**spec.tokens)
    _check_towers(spec, images, audio)
    pictures = [_picture(i, cfg) for i in images]
    clips = [c if isinstance(c, m.AudioInputs) else m.preprocess_audio(_waveform(c, cfg.audio), cfg.audio,
                                                                         cfg.audio_seq_length) for c in audio]
    expanded = m.expand_prompt(tokens, [p.num_soft_tokens for p in pictures], [c.num_soft_tokens for c in clips],
                               tok)
    ids = expanded.ids.astype(np.int64)
    soft = np.zeros((ids.size, hidden), np.float32)
    mask = np.zeros(ids.size, np.int64)
    for kind, items, spans, make in (("image", pictures, expanded.image_spans, image_encoder_inputs),
                                     ("audio", clips, expanded.audio_spans, audio_encoder_inputs)):
        for item, (start, length) in zip(items, spans, strict=True):
            rows = np.asarray(encode[kind](make(item, cfg)), np.float32)
            if rows.shape != (length, hidden):
                raise G4CError(f"the {kind} encoder returned {list(rows.shape)} rows, the prompt has {length} slots")
            soft[start:start + length], mask[start:start + length] = rows, 1
    ids[mask == 1] = spec.pad_token_id  # transformers' llm_input_ids: the PLE reads the pad token there
    reach = np.arange(ids.size, dtype=np.int64)
    if spec.bidirectional_vision:
        for start, length in expanded.image_spans:
            reach[start:start + length] = start + length - 1
    return MediaPrompt(ids, soft, mask, reach, list(expanded.image_spans))


def _check_towers(spec: MediaSpec, images: Sequence, audio: Sequence) -> None:
    for kind, items in (("image", images), ("audio", audio)):
        if items and kind not in spec.towers:
            raise G4CError(f"this model has no {'vision' if kind == 'image' else 'audio'} encoder: it cannot take "
                           f"{'an image' if kind == 'image' else 'audio'}")


def _picture(image, cfg):
    """An image as `g4c.media.ImageInputs`: preprocessed here, or already (an app that preprocessed it
    elsewhere, a device without Pillow)."""
    from g4c import media as m

    if isinstance(image, m.ImageInputs):
        return image
    return m.preprocess_image(m.load_image(image) if isinstance(image, (str, Path)) else image, cfg.image)


def _waveform(clip, cfg) -> np.ndarray:
    from g4c import media as m

    if isinstance(clip, (str, Path)):
        return m.read_wav(clip, cfg.sampling_rate)
    return np.asarray(clip, np.float32)


def image_encoder_inputs(image, cfg=None) -> dict[str, np.ndarray]:
    """`encode_image`'s inputs for one preprocessed image (`g4c.vision` documents them); the patches
    are the model's `2·(pixel_values − 0.5)`, computed in fp32 as transformers' patch embedder does."""
    t = image.pixel_values.shape[0]
    xy = np.ascontiguousarray(image.positions, dtype=np.int64)
    patches = (np.float32(2) * (image.pixel_values.astype(np.float32) - np.float32(0.5))).astype(np.float32)
    return {"patches": patches, "patch_positions": xy, "patch_x": np.ascontiguousarray(xy[:, 0]),
            "patch_y": np.ascontiguousarray(xy[:, 1]), "positions": np.arange(t, dtype=np.int64),
            "reach": np.full(t, t - 1, np.int64), "pool": np.ascontiguousarray(image.pool_index, dtype=np.int64)}


def audio_encoder_inputs(clip, cfg=None) -> dict[str, np.ndarray]:
    """`encode_audio`'s inputs for one preprocessed clip (a `g4c.media.AudioInputs`): its valid
    feature rows (the feature extractor's masked padding rows left out; transformers masks them, so
    the tower computes the same rows without them)."""
    return audio_feature_inputs(clip.features[np.asarray(clip.mask).astype(bool)])


def audio_feature_inputs(features: np.ndarray) -> dict[str, np.ndarray]:
    """`encode_audio`'s inputs for one clip's T valid log-mel frames [T, n_mels] (`g4c.audio` documents
    them): the features, and two ranges that carry the lengths after each stride-2 convolution
    (T1 = ceil(T/2) rows, then S = ceil(T1/2): the clip's soft tokens)."""
    t = int(np.shape(features)[0])
    t1 = _conv_out(t) if t else 0
    return {"features": np.ascontiguousarray(features, dtype=np.float32),
            "conv0_frames": np.arange(t1, dtype=np.int64),
            "frames": np.arange(_conv_out(t1) if t1 else 0, dtype=np.int64)}


def _conv_out(size: int) -> int:
    """Output length of the audio subsampling's kernel-3, stride-2, padding-1 convolution."""
    return (size + 2 - 3) // 2 + 1
