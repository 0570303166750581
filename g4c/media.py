"""Images and audio → exactly the model inputs transformers' Gemma 4 processor makes (numpy + Pillow).

Mirrors, in transformers >= 5.5 (`transformers/models/gemma4/`):
- `Gemma4ImageProcessorPil`: RGB conversion (alpha composited on white), aspect-ratio-preserving PIL
  resize to the soft-token budget, rescale (float64 product cast to float32), optional normalize,
  16-px patches flattened (row, column, channel), (x, y) patch positions;
- `Gemma4VisionPooler._avg_pool_by_positions`: which k×k patches each soft token averages;
- `Gemma4AudioFeatureExtractor`: padding to a multiple of 128 samples, semicausal framing, periodic
  Hann window, |rfft|, HTK mel filter bank, log(mel + mel_floor), frame mask;
- `Gemma4Processor`: placeholder expansion (`boi + image × N + eoi`, `boa + audio × N + eoa`) and the
  audio token count after the encoder's two stride-2 convolutions.

Configs are read from a checkpoint directory in every layout transformers writes or the Hub ships:
`processor_config.json` with nested "image_processor" / "feature_extractor" sections (what
`Gemma4Processor.save_pretrained` writes), or a flat `preprocessor_config.json` (what the image
processor or the feature extractor writes on its own). Every bad input raises `MediaError` (one line).
Pillow is imported inside the functions that need it.
"""

from __future__ import annotations

import functools
import json
import math
import struct
import wave
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from g4c.errors import G4CError

if TYPE_CHECKING:
    from PIL import Image as PILImage

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)  # Gemma4ImageProcessorPil refuses other budgets
PROCESSOR_FILE = "processor_config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"

_IMAGE_KEYS = ("image_processor_type", "patch_size", "max_soft_tokens", "pooling_kernel_size")
_AUDIO_KEYS = ("feature_extractor_type", "feature_size", "frame_length", "hop_length", "mel_floor")


class MediaError(G4CError):
    """An image, a clip, a prompt or a processor config that g4c cannot turn into model inputs."""


# ---------------------------------------------------------------------------------------------------
# Reading config values: JSON null means "the default", as it does for transformers' processors.


def _get(raw: dict, key: str, default: Any) -> Any:
    value = raw.get(key, default)
    return default if value is None else value


def _int(raw: dict, key: str, default: int, minimum: int = 1) -> int:
    value = _get(raw, key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MediaError(f"processor config: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _float(raw: dict, key: str, default: float) -> float:
    value = _get(raw, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MediaError(f"processor config: {key} must be a finite number, got {value!r}")
    return float(value)


def _bool(raw: dict, key: str, default: bool) -> bool:
    value = _get(raw, key, default)
    if not isinstance(value, bool):
        raise MediaError(f"processor config: {key} must be true or false, got {value!r}")
    return value


def _floats(raw: dict, key: str, default: tuple[float, ...] | None, length: int) -> tuple[float, ...] | None:
    """A list of `length` numbers; a single number is repeated, as transformers' normalize does."""
    value = _get(raw, key, default)
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * length
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise MediaError(f"processor config: {key} must be a list of {length} numbers, got {value!r}")
    return tuple(_float({key: v}, key, 0.0) for v in value)


def _reason(exc: BaseException) -> str:
    """An exception's first line, or its type name when it has no message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _bins(raw: dict, key: str, length: int) -> tuple[float, ...] | None:
    """Per-mel-bin values; transformers saves them with shape [1, 1, n], hence the flattening."""
    value = raw.get(key)
    if value is None:
        return None
    try:
        flat = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        flat = None
    if flat is None or flat.size != length or not np.isfinite(flat).all():
        raise MediaError(f"processor config: {key} must hold {length} finite numbers (one per mel bin)")
    return tuple(float(v) for v in flat)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise MediaError(f"processor config: {message}")


# ---------------------------------------------------------------------------------------------------
# Configs


@dataclass(frozen=True)
class ImageConfig:
    """`Gemma4ImageProcessorPil`'s settings (its attribute names and defaults)."""

    patch_size: int = 16
    max_soft_tokens: int = 280
    pooling_kernel_size: int = 3
    do_resize: bool = True
    resample: int = 3  # PIL.Image.BICUBIC
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = False
    image_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    image_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    do_convert_rgb: bool = True

    def __post_init__(self) -> None:
        _check(self.max_soft_tokens in SUPPORTED_SOFT_TOKENS,
               f"max_soft_tokens must be one of {list(SUPPORTED_SOFT_TOKENS)}, got {self.max_soft_tokens}")
        _check(self.patch_size >= 1 and self.pooling_kernel_size >= 1,
               "patch_size and pooling_kernel_size must be positive")
        _check(self.resample in range(6), f"resample must be a PIL filter (0..5), got {self.resample}")
        _check(all(s != 0 for s in self.image_std), "image_std must not contain 0")

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size ** 2

    @classmethod
    def from_dict(cls, raw: dict) -> ImageConfig:
        """An image processor dict (`Gemma4ImageProcessorPil.to_dict()` keys; others ignored)."""
        if not isinstance(raw, dict):
            raise MediaError(f"processor config: the image processor section must be an object, got {raw!r}")
        d = cls()
        return cls(
            patch_size=_int(raw, "patch_size", d.patch_size),
            max_soft_tokens=_int(raw, "max_soft_tokens", d.max_soft_tokens),
            pooling_kernel_size=_int(raw, "pooling_kernel_size", d.pooling_kernel_size),
            do_resize=_bool(raw, "do_resize", d.do_resize),
            resample=_int(raw, "resample", d.resample, minimum=0),
            do_rescale=_bool(raw, "do_rescale", d.do_rescale),
            rescale_factor=_float(raw, "rescale_factor", d.rescale_factor),
            do_normalize=_bool(raw, "do_normalize", d.do_normalize),
            image_mean=_floats(raw, "image_mean", d.image_mean, 3),
            image_std=_floats(raw, "image_std", d.image_std, 3),
            do_convert_rgb=_bool(raw, "do_convert_rgb", d.do_convert_rgb),
        )

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["image_mean"], out["image_std"] = list(self.image_mean), list(self.image_std)
        return out


@dataclass(frozen=True)
class AudioConfig:
    """`Gemma4AudioFeatureExtractor`'s settings, plus the `__call__` defaults the processor uses
    (`max_length`, `pad_to_multiple_of`). Frame and hop lengths are in milliseconds, as its
    constructor takes them: reloading a saved extractor, transformers recomputes the sample counts
    from `frame_length_ms` / `hop_length_ms` (defaults 20 / 10) and ignores the saved `frame_length`,
    `hop_length` and `fft_length`, so `from_dict` refuses saved counts that disagree."""

    sampling_rate: int = 16_000
    feature_size: int = 128  # mel bins
    frame_length_ms: float = 20.0
    hop_length_ms: float = 10.0
    fft_overdrive: bool = False
    min_frequency: float = 0.0
    max_frequency: float = 8000.0
    mel_floor: float = 1e-3
    preemphasis: float = 0.0
    preemphasis_htk_flavor: bool = True
    dither: float = 0.0  # > 0 adds Gaussian noise: not reproducible, as in transformers
    input_scale_factor: float = 1.0
    per_bin_mean: tuple[float, ...] | None = None
    per_bin_stddev: tuple[float, ...] | None = None
    padding_value: float = 0.0
    padding_side: str = "right"
    max_length: int = 480_000  # samples kept (transformers truncates longer clips)
    pad_to_multiple_of: int = 128

    def __post_init__(self) -> None:
        _check(self.frame_length >= 1 and self.hop_length >= 1,
               f"frame_length_ms {self.frame_length_ms} / hop_length_ms {self.hop_length_ms} give empty frames")
        _check(self.min_frequency < self.max_frequency,
               f"min_frequency {self.min_frequency} must be below max_frequency {self.max_frequency}")
        _check(self.padding_side in ("right", "left"), f"padding_side must be right or left, got {self.padding_side!r}")
        _check(self.dither >= 0, f"dither must be >= 0, got {self.dither}")
        _check(self.per_bin_stddev is None or all(s != 0 for s in self.per_bin_stddev),
               "per_bin_stddev must not contain 0")
        for name in ("per_bin_mean", "per_bin_stddev"):
            value = getattr(self, name)
            _check(value is None or len(value) == self.feature_size,
                   f"{name} has {len(value or ())} values, feature_size is {self.feature_size}")

    @property
    def n_mels(self) -> int:
        return self.feature_size

    @property
    def frame_length(self) -> int:
        return int(round(self.sampling_rate * self.frame_length_ms / 1000.0))

    @property
    def hop_length(self) -> int:
        return int(round(self.sampling_rate * self.hop_length_ms / 1000.0))

    @property
    def fft_length(self) -> int:
        return 2 ** math.ceil(math.log2(self.frame_length)) * (2 if self.fft_overdrive else 1)

    @classmethod
    def from_dict(cls, raw: dict) -> AudioConfig:
        """A feature extractor dict (`Gemma4AudioFeatureExtractor.to_dict()` keys; others ignored)."""
        if not isinstance(raw, dict):
            raise MediaError(f"processor config: the feature extractor section must be an object, got {raw!r}")
        d = cls()
        n_mels = _int(raw, "feature_size", d.feature_size)
        side = _get(raw, "padding_side", d.padding_side)
        cfg = cls(
            sampling_rate=_int(raw, "sampling_rate", d.sampling_rate),
            feature_size=n_mels,
            frame_length_ms=_float(raw, "frame_length_ms", d.frame_length_ms),
            hop_length_ms=_float(raw, "hop_length_ms", d.hop_length_ms),
            fft_overdrive=_bool(raw, "fft_overdrive", d.fft_overdrive),
            min_frequency=_float(raw, "min_frequency", d.min_frequency),
            max_frequency=_float(raw, "max_frequency", d.max_frequency),
            mel_floor=_float(raw, "mel_floor", d.mel_floor),
            preemphasis=_float(raw, "preemphasis", d.preemphasis),
            preemphasis_htk_flavor=_bool(raw, "preemphasis_htk_flavor", d.preemphasis_htk_flavor),
            dither=_float(raw, "dither", d.dither),
            input_scale_factor=_float(raw, "input_scale_factor", d.input_scale_factor),
            per_bin_mean=_bins(raw, "per_bin_mean", n_mels),
            per_bin_stddev=_bins(raw, "per_bin_stddev", n_mels),
            padding_value=_float(raw, "padding_value", d.padding_value),
            padding_side=side if isinstance(side, str) else repr(side),
            max_length=_int(raw, "max_length", d.max_length),
            pad_to_multiple_of=_int(raw, "pad_to_multiple_of", d.pad_to_multiple_of),
        )
        for key in ("frame_length", "hop_length", "fft_length"):
            if raw.get(key) is not None and raw[key] != getattr(cfg, key):
                raise MediaError(f"processor config: {key} {raw[key]!r} disagrees with the {getattr(cfg, key)} that "
                                 f"transformers derives from sampling_rate and frame_length_ms / hop_length_ms")
        return cfg

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("per_bin_mean", "per_bin_stddev"):
            out[name] = None if out[name] is None else list(out[name])
        out.update(frame_length=self.frame_length, hop_length=self.hop_length, fft_length=self.fft_length)
        return out


def _sections(raw: dict) -> tuple[dict | None, dict | None]:
    """(image section, audio section) of a config dict: nested under g4c's own "image" / "audio" keys
    or transformers' "image_processor" / "feature_extractor", or the dict itself when it is a flat
    image processor / feature extractor config."""
    image = raw.get("image", raw.get("image_processor"))
    audio = raw.get("audio", raw.get("feature_extractor"))
    if image is None and any(k in raw for k in _IMAGE_KEYS):
        image = raw
    if audio is None and any(k in raw for k in _AUDIO_KEYS):
        audio = raw
    return image, audio


@dataclass(frozen=True)
class ProcessorConfig:
    """A checkpoint's media preprocessing: the image processor, the feature extractor, and
    `Gemma4Processor`'s own settings."""

    image: ImageConfig | None
    audio: AudioConfig | None
    image_seq_length: int = 280
    audio_seq_length: int = 750  # cap on one clip's soft tokens
    audio_ms_per_token: int = 40

    @classmethod
    def from_dict(cls, raw: dict) -> ProcessorConfig:
        """`to_dict()`'s layout, transformers' `processor_config.json` layout, or a flat image
        processor / feature extractor dict."""
        if not isinstance(raw, dict):
            raise MediaError(f"processor config: expected a JSON object, got {type(raw).__name__}")
        image, audio = _sections(raw)
        return cls(
            image=None if image is None else ImageConfig.from_dict(image),
            audio=None if audio is None else AudioConfig.from_dict(audio),
            image_seq_length=_int(raw, "image_seq_length", 280),
            audio_seq_length=_int(raw, "audio_seq_length", 750),
            audio_ms_per_token=_int(raw, "audio_ms_per_token", 40),
        )

    @classmethod
    def from_directory(cls, path: str | Path) -> ProcessorConfig:
        """Reads `processor_config.json` and `preprocessor_config.json`, whichever exist; a section
        found in both comes from `processor_config.json`. Neither file → `ProcessorConfig(None, None)`."""
        path = Path(path)
        if not path.is_dir():
            raise MediaError(f"{path}: not a checkpoint directory")
        found = []
        for file in (path / PROCESSOR_FILE, path / PREPROCESSOR_FILE):
            raw = _read_json(file)
            if raw is None:
                continue
            try:  # check each file alone, so that an error names it
                cls.from_dict(raw)
            except MediaError as exc:
                raise MediaError(f"{file}: {str(exc).removeprefix('processor config: ')}") from None
            found.append(raw)
        merged: dict = {}
        for raw in reversed(found):  # processor_config.json last: it wins
            image, audio = _sections(raw)
            merged.update({k: raw[k] for k in ("image_seq_length", "audio_seq_length", "audio_ms_per_token")
                           if raw.get(k) is not None})
            merged.update({k: v for k, v in (("image", image), ("audio", audio)) if v is not None})
        return cls.from_dict(merged)

    def to_dict(self) -> dict:
        """JSON-able; sections that are None are left out."""
        out: dict = {"image_seq_length": self.image_seq_length, "audio_seq_length": self.audio_seq_length,
                     "audio_ms_per_token": self.audio_ms_per_token}
        if self.image is not None:
            out["image"] = self.image.to_dict()
        if self.audio is not None:
            out["audio"] = self.audio.to_dict()
        return out


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MediaError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(raw, dict):
        raise MediaError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


# ---------------------------------------------------------------------------------------------------
# Images


@dataclass
class ImageInputs:
    pixel_values: np.ndarray  # [N, 3·p²] float32: transformers' pixel_values rows, padding rows dropped
    positions: np.ndarray  # [N, 2] int64 (x, y): image_position_ids, padding rows dropped
    pool_index: np.ndarray  # [S, k²] int64: rows of pixel_values each soft token averages, in pooled order

    @property
    def num_soft_tokens(self) -> int:
        return int(self.pool_index.shape[0])


def _pil():
    """PIL.Image, imported on first use so that `import g4c.media` works without Pillow."""
    try:
        from PIL import Image
    except ImportError:
        raise MediaError("images need Pillow: pip install 'pillow>=10'") from None
    return Image


def load_image(path: str | Path) -> PILImage.Image:
    """An image file as transformers' `image_utils.load_image` opens a path (what `Gemma4Processor`
    does with an image given by path): decoded, EXIF orientation applied, converted to RGB (which, as
    there, drops an alpha channel rather than compositing it)."""
    Image = _pil()
    from PIL import ImageOps

    path = Path(path)
    if not path.exists():
        raise MediaError(f"{path}: no such file")
    if path.is_dir():
        raise MediaError(f"{path}: is a directory, not an image")
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, Image.DecompressionBombError) as exc:
        raise MediaError(f"{path}: not a readable image ({_reason(exc)})") from None


def target_size(height: int, width: int, cfg: ImageConfig) -> tuple[int, int]:
    """`get_aspect_ratio_preserving_size`: the largest (height, width), both multiples of
    patch_size·pooling_kernel_size, with at most max_patches patches."""
    patch, k = cfg.patch_size, cfg.pooling_kernel_size
    target_px = cfg.max_patches * patch ** 2
    factor = math.sqrt(target_px / (height * width))
    side = k * patch
    th = int(math.floor(factor * height / side)) * side
    tw = int(math.floor(factor * width / side)) * side
    if th == 0 and tw == 0:
        raise MediaError(f"a {height}x{width} image resizes to 0x0 patches")
    longest = (cfg.max_patches // k ** 2) * side
    if th == 0:
        th, tw = side, min(int(math.floor(width / height)) * side, longest)
    elif tw == 0:
        th, tw = min(int(math.floor(height / width)) * side, longest), side
    if th * tw > target_px:
        raise MediaError(f"a {height}x{width} image resizes to {th}x{tw}, over {cfg.max_patches} patches")
    return th, tw


def _as_pil(image: Any) -> PILImage.Image:
    Image = _pil()
    if isinstance(image, Image.Image):
        return image
    if not isinstance(image, np.ndarray):
        raise MediaError(f"an image must be a PIL image or a uint8 numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3))):
        raise MediaError(f"a numpy image must be HxW or HxWx3 uint8, got {list(image.shape)} {image.dtype}")
    return Image.fromarray(np.ascontiguousarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image))


def _rgb_array(image: PILImage.Image, convert: bool) -> np.ndarray:
    """HxWx3 uint8, as `PilBackend.process_image` (transformers' `convert_to_rgb` on a PIL image:
    transparency composited onto white)."""
    Image = _pil()
    if convert:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba).convert("RGB")
        else:
            image = image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise MediaError(f"the image has mode {image.mode}; this model's processor config has do_convert_rgb "
                         f"false and takes only 8-bit RGB images")
    return arr


def _pixels(arr: np.ndarray, cfg: ImageConfig) -> np.ndarray:
    """Rescale and normalize with transformers' dtypes: rescale multiplies in float64 and casts to
    float32; normalize runs in float32."""
    out = arr
    if cfg.do_rescale:
        out = (out.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        out = out.astype(np.float32, copy=False)
        out = (out - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    return out.astype(np.float32, copy=False)


def pool_index(patch_width: int, patch_height: int, k: int) -> np.ndarray:
    """[S, k²] row indices (row = y·patch_width + x) per soft token, as `_avg_pool_by_positions`
    groups them: soft token x//k + (patch_width//k)·(y//k), i.e. the pooled grid in row-major order."""
    pw, ph = patch_width // k, patch_height // k
    sy, sx = np.divmod(np.arange(pw * ph), pw)
    dy, dx = np.divmod(np.arange(k * k), k)
    rows = (sy[:, None] * k + dy[None, :]) * patch_width + sx[:, None] * k + dx[None, :]
    return rows.astype(np.int64)


def preprocess_image(image: Any, cfg: ImageConfig) -> ImageInputs:
    """One image → `Gemma4ImageProcessorPil`'s rows for it (PIL image, or HxW / HxWx3 uint8 array)."""
    Image = _pil()
    if cfg is None:
        raise MediaError("this model's checkpoint has no image processor config: it cannot take images")
    arr = _rgb_array(_as_pil(image), cfg.do_convert_rgb)
    h, w = arr.shape[:2]
    if cfg.do_resize:
        th, tw = target_size(h, w, cfg)
        if (th, tw) != (h, w):
            arr = np.asarray(Image.fromarray(arr).resize((tw, th), resample=Image.Resampling(cfg.resample)))
            h, w = th, tw
    p, k = cfg.patch_size, cfg.pooling_kernel_size
    if h % (p * k) or w % (p * k):
        # only reachable with do_resize false; the pooler cannot group a partial k×k block
        raise MediaError(f"a {h}x{w} image is not a multiple of {p * k} pixels on each side "
                         f"(the processor config has do_resize false)")
    ph, pw = h // p, w // p
    if ph * pw > cfg.max_patches:
        raise MediaError(f"a {h}x{w} image has {ph * pw} patches, over this model's {cfg.max_patches}")
    pixels = _pixels(arr, cfg)
    patches = pixels.reshape(ph, p, pw, p, 3).transpose(0, 2, 1, 3, 4).reshape(ph * pw, p * p * 3)
    ys, xs = np.divmod(np.arange(ph * pw, dtype=np.int64), pw)
    return ImageInputs(np.ascontiguousarray(patches), np.stack([xs, ys], axis=1), pool_index(pw, ph, k))


# ---------------------------------------------------------------------------------------------------
# Audio


@dataclass
class AudioInputs:
    features: np.ndarray  # [F, n_mels] float32: input_features for this clip alone
    mask: np.ndarray  # [F] bool: input_features_mask
    num_soft_tokens: int  # the audio placeholders Gemma4Processor inserts for this clip


def read_wav(path: str | Path, sampling_rate: int) -> np.ndarray:
    """A PCM WAV file (8/16/24/32-bit integer samples) as float32 mono in [-1, 1], channels averaged.
    Audio at another rate is refused: transformers resamples, g4c asks the user to."""
    path = Path(path)
    if not path.exists():
        raise MediaError(f"{path}: no such file")
    if path.is_dir():
        raise MediaError(f"{path}: is a directory, not a WAV file")
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate, frames = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            if rate != sampling_rate:
                raise MediaError(f"{path}: {rate} Hz audio; this model needs {sampling_rate} Hz "
                                 f"(resample it first, e.g. ffmpeg -ar {sampling_rate})")
            raw = w.readframes(frames)
    except (wave.Error, EOFError, OSError) as exc:
        raise MediaError(f"{path}: not a readable PCM WAV file ({_reason(exc)}); convert it, "
                         f"e.g. ffmpeg -ar {sampling_rate} -c:a pcm_s16le out.wav") from None
    if width not in (1, 2, 3, 4):
        raise MediaError(f"{path}: {8 * width}-bit samples; 8, 16, 24 or 32-bit PCM is read")
    got = len(raw) // (width * channels)
    if got != frames or len(raw) % (width * channels):
        raise MediaError(f"{path}: truncated WAV file (the header promises {frames} frames, the file holds {got})")
    if frames == 0:
        raise MediaError(f"{path}: the WAV file holds no audio")
    return (_pcm(raw, width).reshape(frames, channels).mean(axis=1)).astype(np.float32)


def _pcm(raw: bytes, width: int) -> np.ndarray:
    """Little-endian PCM → float64 in [-1, 1) (8-bit WAV is unsigned, the others signed)."""
    if width == 1:
        return (np.frombuffer(raw, np.uint8).astype(np.float64) - 128.0) / 128.0
    if width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        value = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        return ((value ^ 0x800000) - 0x800000).astype(np.float64) / float(1 << 23)
    dtype = np.dtype("<i2") if width == 2 else np.dtype("<i4")
    return np.frombuffer(raw, dtype).astype(np.float64) / float(1 << (8 * width - 1))


@functools.lru_cache(maxsize=8)
def mel_filters(num_bins: int, n_mels: int, fmin: float, fmax: float, sampling_rate: int) -> np.ndarray:
    """[num_bins, n_mels] float64: `audio_utils.mel_filter_bank(norm=None, mel_scale="htk")`."""
    mel_min = 2595.0 * np.log10(1.0 + fmin / 700.0)
    mel_max = 2595.0 * np.log10(1.0 + fmax / 700.0)
    filter_freqs = 700.0 * (np.power(10, np.linspace(mel_min, mel_max, n_mels + 2) / 2595.0) - 1.0)
    fft_freqs = np.linspace(0, sampling_rate // 2, num_bins)
    diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    down, up = -slopes[:, :-2] / diff[:-1], slopes[:, 2:] / diff[1:]
    filters = np.maximum(np.zeros(1), np.minimum(down, up))
    filters.flags.writeable = False  # shared by the cache
    return filters


def _padded(x: np.ndarray, cfg: AudioConfig) -> tuple[np.ndarray, np.ndarray]:
    """`SequenceFeatureExtractor.pad` for one clip: truncate to max_length (rounded up to
    pad_to_multiple_of, as `_truncate` does), pad to a multiple of pad_to_multiple_of."""
    m = cfg.pad_to_multiple_of
    x = x[: -(-cfg.max_length // m) * m]
    n, total = x.size, -(-x.size // m) * m
    wav = np.full(total, cfg.padding_value, np.float32)
    mask = np.zeros(total, np.int32)
    at = slice(0, n) if cfg.padding_side == "right" else slice(total - n, total)
    wav[at], mask[at] = x, 1
    return wav, mask


def _log_mel(wav: np.ndarray, cfg: AudioConfig) -> np.ndarray:
    """`_extract_spectrogram` on framed float32 audio: window and |rfft| in float32 (numpy >= 2
    keeps float32 FFTs in single precision), mel projection and log in float64."""
    frame = cfg.frame_length + 1  # one extra sample feeds the preemphasis
    count = (wav.size - frame) // cfg.hop_length + 1
    frames = (np.lib.stride_tricks.sliding_window_view(wav, frame)[:: cfg.hop_length][:count] if count > 0
              else np.zeros((0, frame), wav.dtype))
    p = cfg.preemphasis
    if p > 0.0 and cfg.preemphasis_htk_flavor:
        frames = np.concatenate([frames[:, :1] * (1.0 - p), frames[:, 1:-1] - p * frames[:, :-2]], axis=-1)
    elif p > 0.0:
        frames = frames[:, 1:] - p * frames[:, :-1]
    else:
        frames = frames[:, :-1]
    window = np.hanning(cfg.frame_length + 1)[:-1].astype(np.float32)  # periodic Hann
    magnitude = np.abs(np.fft.rfft(frames * window, n=cfg.fft_length, axis=-1))
    filters = mel_filters(cfg.fft_length // 2 + 1, cfg.feature_size, cfg.min_frequency, cfg.max_frequency,
                          cfg.sampling_rate)
    log_mel = np.log(np.matmul(magnitude, filters) + np.float64(cfg.mel_floor))
    if cfg.per_bin_mean is not None:
        log_mel = log_mel - np.asarray(cfg.per_bin_mean)
    if cfg.per_bin_stddev is not None:
        log_mel = log_mel / np.asarray(cfg.per_bin_stddev)
    return log_mel.astype(np.float32)


def audio_soft_tokens(mask: np.ndarray, audio_seq_length: int) -> int:
    """`Gemma4Processor.replace_audio_token`: the mask through two stride-2 convolutions (kernel 3,
    padding 1), counted, capped at audio_seq_length as `_compute_audio_num_tokens` caps it."""
    t = len(mask)
    for _ in range(2):
        mask = mask[::2][: (t + 2 - 3) // 2 + 1]
        t = len(mask)
    return min(int(mask.sum()), audio_seq_length)


def preprocess_audio(waveform: np.ndarray, cfg: AudioConfig, audio_seq_length: int = 750) -> AudioInputs:
    """One mono clip at cfg.sampling_rate → what `Gemma4Processor` gives for it alone:
    `Gemma4AudioFeatureExtractor` features and mask (a batch pads further, with masked zero rows)
    and the number of audio soft tokens."""
    if cfg is None:
        raise MediaError("this model's checkpoint has no audio feature extractor config: it cannot take audio")
    x = np.asarray(waveform)
    if x.ndim != 1 or x.size == 0 or not np.issubdtype(x.dtype, np.floating):
        raise MediaError(f"a waveform must be a non-empty 1-D float array of mono samples, "
                         f"got {list(x.shape)} {x.dtype}")
    wav, attention = _padded(x.astype(np.float32), cfg)
    if cfg.dither > 0.0:
        wav = wav + cfg.dither * np.random.default_rng().standard_normal(wav.shape).astype(np.float32)
    if cfg.input_scale_factor != 1.0:
        wav = wav * np.float32(cfg.input_scale_factor)
    left = cfg.frame_length // 2  # semicausal: the first frame is centred on the first sample
    wav = np.concatenate([np.zeros(left, np.float32), wav])
    attention = np.concatenate([np.zeros(left, np.int32), attention])
    features = _log_mel(wav, cfg)
    ends = np.arange(features.shape[0]) * cfg.hop_length + cfg.frame_length  # each frame's last sample
    mask = attention[ends].astype(bool)
    features = features * mask[:, None]
    return AudioInputs(features, mask, audio_soft_tokens(mask, audio_seq_length))


# ---------------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class MediaTokens:
    """The media token ids of a checkpoint's config.json (`Gemma4Config`)."""

    image: int | None
    boi: int | None
    eoi: int | None
    audio: int | None
    boa: int | None
    eoa: int | None

    @classmethod
    def from_config(cls, raw: dict) -> MediaTokens:
        """Top-level `image_token_id`, `boi_token_id`, `eoi_token_id`, `audio_token_id`,
        `boa_token_id` and `eoa_token_index` (Gemma4Config's spelling; `eoa_token_id` accepted)."""
        def token(*keys: str) -> int | None:
            for key in keys:
                value = raw.get(key)
                if value is None:
                    continue
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise MediaError(f"config.json: {key} must be a token id, got {value!r}")
                return value
            return None

        return cls(token("image_token_id", "image_token_index"), token("boi_token_id"), token("eoi_token_id"),
                   token("audio_token_id", "audio_token_index"), token("boa_token_id"),
                   token("eoa_token_index", "eoa_token_id"))


@dataclass
class ExpandedPrompt:
    ids: np.ndarray  # int64
    image_spans: list[tuple[int, int]]  # (start, length) of each image's soft tokens
    audio_spans: list[tuple[int, int]]


def expand_prompt(ids: Any, image_tokens: list[int], audio_tokens: list[int], tokens: MediaTokens) -> ExpandedPrompt:
    """`Gemma4Processor`'s placeholder expansion on token ids: the i-th image placeholder becomes
    boi + image × image_tokens[i] + eoi, the j-th audio placeholder boa + audio × audio_tokens[j] + eoa."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    kinds = {"image": (tokens.image, tokens.boi, tokens.eoi, list(image_tokens)),
             "audio": (tokens.audio, tokens.boa, tokens.eoa, list(audio_tokens))}
    found = {kind: (ids == soft) if soft is not None else np.zeros(ids.size, bool)
             for kind, (soft, _, _, _) in kinds.items()}
    n_img, n_aud = int(found["image"].sum()), int(found["audio"].sum())
    if n_img != len(image_tokens) or n_aud != len(audio_tokens):
        raise MediaError(f"the prompt has {n_img} image and {n_aud} audio placeholders, but {len(image_tokens)} "
                         f"images and {len(audio_tokens)} audio clips were given")
    for kind, (soft, begin, end, counts) in kinds.items():
        if counts and (begin is None or end is None):
            raise MediaError(f"this model's config.json lacks the {kind} begin/end token ids: it cannot take "
                             f"{kind} inputs")
        if any(int(n) < 0 for n in counts):
            raise MediaError(f"an {kind} cannot have a negative number of soft tokens: {counts}")
    pieces: list[np.ndarray] = []
    spans: dict[str, list[tuple[int, int]]] = {"image": [], "audio": []}
    done, length = 0, 0
    for at in np.flatnonzero(found["image"] | found["audio"]):
        kind = "image" if found["image"][at] else "audio"
        soft, begin, end, counts = kinds[kind]
        n = int(counts[len(spans[kind])])
        pieces += [ids[done:at], np.asarray([begin] + [soft] * n + [end], np.int64)]
        length += at - done
        spans[kind].append((int(length) + 1, n))
        length += n + 2
        done = at + 1
    pieces.append(ids[done:])
    return ExpandedPrompt(np.concatenate(pieces).astype(np.int64), spans["image"], spans["audio"])
