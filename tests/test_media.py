"""g4c.media against transformers' own Gemma 4 processors: image rows, positions and pooling groups,
audio features, masks and token counts, placeholder expansion through a real `Gemma4Processor`, WAV
and image reading, and processor configs as transformers' save_pretrained writes them."""

from __future__ import annotations

import json
import wave
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("PIL")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402
from transformers.models.gemma4 import (  # noqa: E402
    Gemma4AudioFeatureExtractor,
    Gemma4ImageProcessorPil,
    Gemma4Processor,
)
from transformers.models.gemma4.configuration_gemma4 import Gemma4VisionConfig  # noqa: E402
from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionPooler  # noqa: E402

from g4c.media import (  # noqa: E402
    AudioConfig,
    ImageConfig,
    MediaError,
    MediaTokens,
    ProcessorConfig,
    expand_prompt,
    load_image,
    preprocess_audio,
    preprocess_image,
    read_wav,
)

SR = 16_000
# log-mel features span about [-7, 5]; g4c repeats transformers' float32/float64 steps, so they agree
# to the last bit here, but only this tolerance is promised across numpy/BLAS builds.
AUDIO_ATOL, AUDIO_RTOL = 1e-4, 1e-5


def rgb(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def rgba(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")


def gray(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8), "L")


# (name, image, Gemma4ImageProcessorPil kwargs)
IMAGE_CASES = [
    ("48x48 upscaled", rgb(48, 48), {"max_soft_tokens": 70}),
    ("333x517", rgb(333, 517, 1), {}),
    ("1000x200", rgb(1000, 200, 2), {}),
    ("40x900 extreme aspect", rgb(40, 900, 3), {}),
    ("12x1500 height rounds to 0", rgb(12, 1500, 4), {"max_soft_tokens": 70}),
    ("grayscale", gray(300, 200, 5), {"max_soft_tokens": 140}),
    ("rgba", rgba(120, 160, 6), {"max_soft_tokens": 140}),
    ("336x480 needs no resize", rgb(336, 480, 7), {"max_soft_tokens": 70}),
    ("normalized", rgb(200, 300, 8), {"do_normalize": True, "image_mean": [0.5, 0.4, 0.3],
                                      "image_std": [0.2, 0.3, 0.25]}),
    ("bilinear, no rescale", rgb(100, 90, 9), {"resample": 2, "do_rescale": False, "max_soft_tokens": 560}),
]


def hf_images(images: list, **kwargs) -> dict:
    return Gemma4ImageProcessorPil(**kwargs)(images, return_tensors="np")


def assert_image_matches(ours, hf: dict, b: int = 0) -> None:
    n = ours.pixel_values.shape[0]
    assert ours.pixel_values.dtype == np.float32 and ours.positions.dtype == np.int64
    np.testing.assert_array_equal(ours.pixel_values, hf["pixel_values"][b, :n])
    np.testing.assert_array_equal(ours.positions, hf["image_position_ids"][b, :n])
    assert (hf["image_position_ids"][b, n:] == -1).all()  # everything after our rows is padding
    if "num_soft_tokens_per_image" in hf:  # Gemma4Processor drops it from its output
        assert ours.num_soft_tokens == hf["num_soft_tokens_per_image"][b]


@pytest.mark.parametrize("name,image,kwargs", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_image_matches_transformers(name, image, kwargs):
    hf = hf_images([image], **kwargs)
    cfg = ImageConfig.from_dict(Gemma4ImageProcessorPil(**kwargs).to_dict())
    assert_image_matches(preprocess_image(image, cfg), hf)


def test_numpy_images():
    arr = np.asarray(rgb(77, 131, 10))
    assert_image_matches(preprocess_image(arr, ImageConfig()), hf_images([arr]))
    plane = np.asarray(gray(64, 50, 11))  # transformers cannot take HxW arrays: compare with the PIL "L" image
    assert_image_matches(preprocess_image(plane, ImageConfig()), hf_images([Image.fromarray(plane)]))
    with pytest.raises(MediaError, match="uint8"):
        preprocess_image(arr.astype(np.float32), ImageConfig())


@pytest.mark.parametrize("budget", [70, 280])
def test_pool_index_matches_vision_pooler(budget):
    """Averaging per-patch features over pool_index rows equals `_avg_pool_by_positions` on the
    padded batch, soft token by soft token."""
    images = [rgb(333, 517, 12), rgb(40, 900, 13), rgb(12, 1500, 14), rgb(336, 480, 15)]
    hf = hf_images(images, max_soft_tokens=budget)
    batch, patches = hf["image_position_ids"].shape[:2]
    padding = (hf["image_position_ids"] == -1).all(-1)
    feats = np.random.default_rng(16).standard_normal((batch, patches, 8)).astype(np.float32)
    feats[padding] = 0.0  # Gemma4VisionPooler.forward zeroes padding rows before pooling
    pooler = Gemma4VisionPooler(Gemma4VisionConfig(hidden_size=8, num_attention_heads=2, intermediate_size=16,
                                                   num_hidden_layers=1))
    out, mask = pooler._avg_pool_by_positions(torch.from_numpy(feats), torch.from_numpy(hf["image_position_ids"]),
                                              budget)
    cfg = ImageConfig(max_soft_tokens=budget)
    for b, image in enumerate(images):
        ours = preprocess_image(image, cfg)
        n = ours.pixel_values.shape[0]
        assert ours.pool_index.shape == (ours.num_soft_tokens, 9)
        assert sorted(ours.pool_index.reshape(-1).tolist()) == list(range(n))  # every patch exactly once
        expected = out[b][mask[b]].numpy()
        np.testing.assert_allclose(feats[b, :n][ours.pool_index].mean(axis=1), expected, atol=1e-6, rtol=1e-5)


def clips() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20)
    t = np.arange(int(2.7 * SR)) / SR
    return {
        "noise 0.3 s": (0.1 * rng.standard_normal(int(0.3 * SR))).astype(np.float32),
        "noise 1 s": (0.3 * rng.standard_normal(SR)).astype(np.float32),
        "sine 2.7 s": (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32),
        "float64 noise 1.01 s": 0.2 * rng.standard_normal(16_160),
        "100 samples (no frame)": (0.1 * rng.standard_normal(100)).astype(np.float32),
        "31 s, truncated to 30 s": (0.05 * rng.standard_normal(31 * SR)).astype(np.float32),
    }


def hf_audio_tokens(fe, hf: dict, clip: np.ndarray) -> tuple[int, int]:
    """(replace_audio_token's count, _compute_audio_num_tokens) as Gemma4Processor computes them."""
    proc = SimpleNamespace(boa_token="<boa>", audio_token="<a>", eoa_token="<eoa>", feature_extractor=fe,
                           audio_seq_length=750)
    return (Gemma4Processor.replace_audio_token(proc, hf, 0).count("<a>"),
            Gemma4Processor._compute_audio_num_tokens(proc, clip, SR))


def assert_audio_matches(ours, hf: dict) -> None:
    assert ours.features.dtype == np.float32 and ours.mask.dtype == bool
    np.testing.assert_allclose(ours.features, hf["input_features"][0], atol=AUDIO_ATOL, rtol=AUDIO_RTOL)
    np.testing.assert_array_equal(ours.mask, hf["input_features_mask"][0])


@pytest.mark.parametrize("name", list(clips()))
def test_audio_matches_transformers(name):
    clip = clips()[name]
    fe = Gemma4AudioFeatureExtractor()
    hf = fe([clip], return_tensors="np")  # a list, as Gemma4Processor passes clips
    ours = preprocess_audio(clip, AudioConfig.from_dict(json.loads(fe.to_json_string())))
    assert_audio_matches(ours, hf)
    replaced, computed = hf_audio_tokens(fe, hf, clip)
    assert ours.num_soft_tokens == min(replaced, 750) == computed


@pytest.mark.parametrize("htk", [True, False])
def test_audio_non_default_settings(htk):
    rng = np.random.default_rng(21)
    settings = dict(feature_size=64, frame_length_ms=25.0, hop_length_ms=12.5, min_frequency=60.0,
                    max_frequency=7600.0, preemphasis=0.97, preemphasis_htk_flavor=htk, fft_overdrive=True,
                    input_scale_factor=2.0, mel_floor=1e-5, per_bin_mean=rng.standard_normal(64).tolist(),
                    per_bin_stddev=(1.0 + rng.random(64)).tolist(), padding_value=0.25,
                    padding_side="right" if htk else "left")
    fe = Gemma4AudioFeatureExtractor(**settings)
    clip = (0.2 * rng.standard_normal(12_345)).astype(np.float32)
    saved = json.loads(fe.to_json_string())
    cfg = AudioConfig.from_dict({**saved, "frame_length_ms": 25.0, "hop_length_ms": 12.5})
    assert (cfg.frame_length, cfg.hop_length, cfg.fft_length) == (fe.frame_length, fe.hop_length, fe.fft_length)
    hf = fe([clip], return_tensors="np")
    ours = preprocess_audio(clip, cfg)
    assert_audio_matches(ours, hf)
    assert ours.num_soft_tokens == hf_audio_tokens(fe, hf, clip)[0]
    # transformers reloads this extractor with the default 20 ms frames (it recomputes frame_length
    # from frame_length_ms, which it does not save): g4c refuses the contradiction
    with pytest.raises(MediaError, match="frame_length 400"):
        AudioConfig.from_dict(saved)


def test_audio_refuses_bad_waveforms():
    with pytest.raises(MediaError, match="1-D"):
        preprocess_audio(np.zeros((2, 100), np.float32), AudioConfig())
    with pytest.raises(MediaError, match="1-D"):
        preprocess_audio(np.zeros(0, np.float32), AudioConfig())
    with pytest.raises(MediaError, match="float"):
        preprocess_audio(np.zeros(100, np.int16), AudioConfig())


# --- the whole processor: placeholders, rows and features -------------------------------------

SPECIALS = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
            "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"}


@pytest.fixture(scope="module")
def processor():
    """A Gemma4Processor over a word-level tokenizer; the video processor (which needs torchvision)
    is a stub, as nothing here processes video."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import PushToHubMixin

    words = ["<pad>", "<eos>", "<bos>", "<unk>", *SPECIALS.values(), "<|video|>", "describe", "and", "then"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                  unk_token="<unk>", extra_special_tokens=SPECIALS)

    class VideoStub(PushToHubMixin):
        _auto_class = None

        def to_dict(self) -> dict:
            return {}

    class Processor(Gemma4Processor):
        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" else super().check_argument_for_proper_class(name, arg)

    return Processor(feature_extractor=Gemma4AudioFeatureExtractor(),
                     image_processor=Gemma4ImageProcessorPil(max_soft_tokens=70), tokenizer=tok,
                     video_processor=VideoStub(), image_seq_length=70, audio_seq_length=750)


def test_processor_end_to_end(processor, tmp_path):
    tok = processor.tokenizer
    text = "describe <|image|> and <|audio|> then <|image|>"
    images = [rgb(100, 60, 30), rgb(48, 400, 31)]
    clip = clips()["noise 1 s"]
    hf = processor(text=[text], images=[images], audio=[clip], return_tensors="np")

    tokens = MediaTokens.from_config({"image_token_id": tok.convert_tokens_to_ids("<|image|>"),
                                      "boi_token_id": tok.convert_tokens_to_ids("<|image>"),
                                      "eoi_token_id": tok.convert_tokens_to_ids("<image|>"),
                                      "audio_token_id": tok.convert_tokens_to_ids("<|audio|>"),
                                      "boa_token_id": tok.convert_tokens_to_ids("<|audio>"),
                                      "eoa_token_index": tok.convert_tokens_to_ids("<audio|>")})
    processor.save_pretrained(tmp_path)
    cfg = ProcessorConfig.from_directory(tmp_path)
    pictures = [preprocess_image(im, cfg.image) for im in images]
    audio = preprocess_audio(clip, cfg.audio, cfg.audio_seq_length)
    expanded = expand_prompt(tok(text)["input_ids"], [p.num_soft_tokens for p in pictures],
                             [audio.num_soft_tokens], tokens)
    np.testing.assert_array_equal(expanded.ids, hf["input_ids"][0])
    for b, picture in enumerate(pictures):
        assert_image_matches(picture, hf, b)
    assert_audio_matches(audio, hf)
    for (start, n), want in zip(expanded.image_spans + expanded.audio_spans,
                                ["<|image|>"] * 2 + ["<|audio|>"]):
        assert set(hf["input_ids"][0][start:start + n].tolist()) == {tok.convert_tokens_to_ids(want)}


# --- prompts --------------------------------------------------------------------------------------

TOKENS = MediaTokens(image=90, boi=91, eoi=92, audio=80, boa=81, eoa=82)


def test_expand_prompt_order_and_spans():
    out = expand_prompt([1, 90, 2, 80, 90, 3], [2, 3], [1], TOKENS)
    assert out.ids.dtype == np.int64
    assert out.ids.tolist() == [1, 91, 90, 90, 92, 2, 81, 80, 82, 91, 90, 90, 90, 92, 3]
    assert out.image_spans == [(2, 2), (10, 3)] and out.audio_spans == [(7, 1)]
    assert expand_prompt(np.array([5, 6]), [], [], TOKENS).ids.tolist() == [5, 6]


def test_expand_prompt_counts_must_match():
    with pytest.raises(MediaError, match="2 image and 0 audio placeholders, but 1 images and 0 audio"):
        expand_prompt([90, 90], [4], [], TOKENS)
    with pytest.raises(MediaError, match="1 image and 1 audio placeholders, but 2 images and 1 audio"):
        expand_prompt([90, 80], [4, 4], [3], TOKENS)
    with pytest.raises(MediaError, match="0 audio placeholders, but 0 images and 1 audio"):
        expand_prompt([1, 2], [], [3], TOKENS)
    no_audio = MediaTokens(image=90, boi=91, eoi=92, audio=None, boa=None, eoa=None)
    with pytest.raises(MediaError, match="0 audio placeholders"):
        expand_prompt([80], [], [5], no_audio)


def test_media_tokens_from_config():
    raw = {"image_token_id": 258880, "boi_token_id": 255999, "eoi_token_id": 258882, "audio_token_id": 258881,
           "boa_token_id": 256000, "eoa_token_index": 258883}
    assert MediaTokens.from_config(raw) == MediaTokens(258880, 255999, 258882, 258881, 256000, 258883)
    hub = {**raw, "eoa_token_id": 258883}
    del hub["eoa_token_index"]
    assert MediaTokens.from_config(hub).eoa == 258883
    assert MediaTokens.from_config({}) == MediaTokens(None, None, None, None, None, None)
    with pytest.raises(MediaError, match="boi_token_id"):
        MediaTokens.from_config({"boi_token_id": "x"})


# --- WAV files ------------------------------------------------------------------------------------


def write_wav(path: Path, raw: bytes, width: int, channels: int = 1, rate: int = SR) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)
    return path


def test_read_wav_formats(tmp_path):
    rng = np.random.default_rng(40)
    s16 = rng.integers(-32768, 32768, 1000).astype("<i2")
    np.testing.assert_array_equal(read_wav(write_wav(tmp_path / "m16.wav", s16.tobytes(), 2), SR), s16 / 32768.0)

    stereo = rng.integers(-32768, 32768, (1000, 2)).astype("<i2")
    got = read_wav(write_wav(tmp_path / "s16.wav", stereo.tobytes(), 2, channels=2), SR)
    assert got.dtype == np.float32 and got.shape == (1000,)
    np.testing.assert_allclose(got, stereo.mean(axis=1) / 32768.0, atol=1e-7)

    s24 = rng.integers(-(1 << 23), 1 << 23, 1000)
    raw24 = b"".join(int(v).to_bytes(3, "little", signed=True) for v in s24)
    np.testing.assert_allclose(read_wav(write_wav(tmp_path / "m24.wav", raw24, 3), SR), s24 / float(1 << 23),
                               atol=1e-7)

    s32 = rng.integers(-(1 << 31), 1 << 31, 1000).astype("<i4")
    np.testing.assert_allclose(read_wav(write_wav(tmp_path / "m32.wav", s32.tobytes(), 4), SR), s32 / float(1 << 31),
                               atol=1e-7)

    u8 = np.array([0, 64, 128, 192, 255], np.uint8)
    np.testing.assert_array_equal(read_wav(write_wav(tmp_path / "m8.wav", u8.tobytes(), 1), SR),
                                  [-1.0, -0.5, 0.0, 0.5, 127 / 128])


def test_read_wav_refusals(tmp_path):
    with pytest.raises(MediaError, match=r"clip\.wav: 44100 Hz audio; this model needs 16000 Hz \(resample"):
        read_wav(write_wav(tmp_path / "clip.wav", bytes(200), 2, rate=44_100), SR)
    good = write_wav(tmp_path / "good.wav", np.arange(4000, dtype="<i2").tobytes(), 2)
    (tmp_path / "cut.wav").write_bytes(good.read_bytes()[:3000])
    with pytest.raises(MediaError, match="cut.wav: truncated"):
        read_wav(tmp_path / "cut.wav", SR)
    (tmp_path / "junk.wav").write_bytes(b"this is not a wave file at all" * 10)
    with pytest.raises(MediaError, match="junk.wav: not a readable PCM WAV file"):
        read_wav(tmp_path / "junk.wav", SR)
    (tmp_path / "stub.wav").write_bytes(good.read_bytes()[:20])
    with pytest.raises(MediaError, match="stub.wav: not a readable PCM WAV file"):
        read_wav(tmp_path / "stub.wav", SR)
    with pytest.raises(MediaError, match="missing.wav: no such file"):
        read_wav(tmp_path / "missing.wav", SR)
    with pytest.raises(MediaError, match="is a directory"):
        read_wav(tmp_path, SR)
    with pytest.raises(MediaError, match="holds no audio"):
        read_wav(write_wav(tmp_path / "empty.wav", b"", 2), SR)


# --- image files ----------------------------------------------------------------------------------


def test_load_image_like_transformers(tmp_path):
    from transformers.image_utils import load_image as hf_load_image

    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90° clockwise to view
    rgb(40, 70, 50).save(path, exif=exif)
    ours = load_image(path)
    assert ours.size == (40, 70) and ours.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(hf_load_image(str(path))))
    png = tmp_path / "alpha.png"
    rgba(30, 20, 51).save(png)
    np.testing.assert_array_equal(np.asarray(load_image(png)), np.asarray(hf_load_image(str(png))))


def test_load_image_refusals(tmp_path):
    with pytest.raises(MediaError, match="nope.png: no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(MediaError, match="is a directory"):
        load_image(tmp_path)
    (tmp_path / "junk.png").write_bytes(b"\x89PNG but not really" * 20)
    with pytest.raises(MediaError, match="junk.png: not a readable image"):
        load_image(tmp_path / "junk.png")
    rgb(64, 64, 52).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:400])
    with pytest.raises(MediaError, match="cut.png: not a readable image"):
        load_image(tmp_path / "cut.png")


# --- processor configs ----------------------------------------------------------------------------


def test_config_from_individual_save_pretrained(tmp_path):
    Gemma4ImageProcessorPil(max_soft_tokens=560, do_normalize=True, image_mean=0.5, image_std=0.25) \
        .save_pretrained(tmp_path / "image")
    cfg = ProcessorConfig.from_directory(tmp_path / "image")  # a flat preprocessor_config.json
    assert cfg.audio is None
    assert cfg.image == ImageConfig(max_soft_tokens=560, do_normalize=True, image_mean=(0.5,) * 3,
                                    image_std=(0.25,) * 3)
    Gemma4AudioFeatureExtractor(feature_size=80, per_bin_mean=[0.5] * 80).save_pretrained(tmp_path / "audio")
    cfg = ProcessorConfig.from_directory(tmp_path / "audio")
    assert cfg.image is None and cfg.audio == AudioConfig(feature_size=80, per_bin_mean=(0.5,) * 80)
    (tmp_path / "empty").mkdir()
    assert ProcessorConfig.from_directory(tmp_path / "empty") == ProcessorConfig(None, None)
    with pytest.raises(MediaError, match="nothing: not a checkpoint directory"):
        ProcessorConfig.from_directory(tmp_path / "nothing")


def test_config_from_processor_save_pretrained(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    assert not (tmp_path / "preprocessor_config.json").exists()
    raw = json.loads((tmp_path / "processor_config.json").read_text())
    assert {"image_processor", "feature_extractor", "image_seq_length", "audio_seq_length"} <= set(raw)
    cfg = ProcessorConfig.from_directory(tmp_path)
    assert cfg == ProcessorConfig(ImageConfig(max_soft_tokens=70), AudioConfig(), image_seq_length=70)
    assert ProcessorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_config_hub_layout_and_round_trip(tmp_path):
    # processor_config.json holds the processor and its image processor (with Hub extras such as
    # "size"); the feature extractor is a flat preprocessor_config.json beside it
    (tmp_path / "processor_config.json").write_text(json.dumps({
        "processor_class": "Gemma4Processor", "image_seq_length": 280, "audio_seq_length": 375,
        "image_processor": {"image_processor_type": "Gemma4ImageProcessor", "image_seq_length": 280,
                            "max_soft_tokens": 1120, "size": {"height": 224, "width": 224}, "resample": 3}}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "feature_extractor_type": "Gemma4AudioFeatureExtractor", "feature_size": 128, "sampling_rate": 16000,
        "frame_length": 320, "hop_length": 160, "fft_length": 512, "per_bin_mean": None}))
    cfg = ProcessorConfig.from_directory(tmp_path)
    assert cfg.image == ImageConfig(max_soft_tokens=1120) and cfg.audio == AudioConfig()
    assert cfg.audio_seq_length == 375
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["image"]["max_soft_tokens"] == 1120 and ProcessorConfig.from_dict(data) == cfg
    image_only = ProcessorConfig(ImageConfig(), None)
    assert "audio" not in image_only.to_dict() and ProcessorConfig.from_dict(image_only.to_dict()) == image_only


def test_config_errors(tmp_path):
    (tmp_path / "processor_config.json").write_text("{not json")
    with pytest.raises(MediaError, match="processor_config.json: not a readable JSON file"):
        ProcessorConfig.from_directory(tmp_path)
    for bad, match in [({"max_soft_tokens": 100}, "max_soft_tokens must be one of"),
                       ({"patch_size": "16"}, "patch_size must be an integer"),
                       ({"do_resize": "yes"}, "do_resize must be true or false"),
                       ({"image_mean": [0.5, 0.5]}, "image_mean must be a list of 3")]:
        with pytest.raises(MediaError, match=match):
            ProcessorConfig.from_dict({"image_processor": {"patch_size": 16, **bad}})
    for bad, match in [({"sampling_rate": -1}, "sampling_rate must be an integer >= 1"),
                       ({"per_bin_mean": [1.0, 2.0]}, "per_bin_mean must hold 128"),
                       ({"min_frequency": 9000.0}, "below max_frequency"),
                       ({"hop_length": 100}, "hop_length 100 disagrees")]:
        with pytest.raises(MediaError, match=match):
            ProcessorConfig.from_dict({"feature_extractor": {"feature_size": 128, **bad}})
    with pytest.raises(MediaError, match="audio_seq_length"):
        ProcessorConfig.from_dict({"audio_seq_length": 0})
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {"max_soft_tokens": 99}}))
    with pytest.raises(MediaError, match=r"processor_config.json: max_soft_tokens must be one of"):
        ProcessorConfig.from_directory(tmp_path)
