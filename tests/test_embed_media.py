"""Images and audio through the embeddable C runtime (`g4c.embed`): a tiny multimodal checkpoint (PLE,
sliding and full layers, KV sharing, bidirectional image blocks, 2-layer vision and audio towers) compiled
for llvm with its C runtime; a C app (tests/c/embed_media.c) encodes images and a clip preprocessed here
with `g4c.media` (`g4c_encode_image`, `g4c_encode_audio`), places the rows in the expanded prompt and runs
`g4c_prefill_media` and greedy decoding: the encoder rows, the logits and the tokens equal the Python
runtime's (`g4c.load(...).prefill(ids, images=..., audio=...)`); bad input is an error code and a one-line
message; a text-only artifact's library says it takes no media."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hf_reference import VISION, make_multimodal_checkpoint

from g4c import media as m
from g4c.cli import main
from g4c.compiler import compile_model
from g4c.model import load_model
from g4c.runtime import load
from g4c.runtime.media import audio_encoder_inputs, image_encoder_inputs

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "tests" / "c" / "embed_media.c"
C_FLAGS = ["-O2", "-std=c99", "-D_POSIX_C_SOURCE=200809L", "-Wall", "-Werror"]
CHUNK = 8  # every image block (60 and 70 soft tokens) is longer than a chunk: it is a chunk of its own
NEW_TOKENS = 12
TEXT = dict(vocab_size=300, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=1, head_dim=12, global_head_dim=24, sliding_window=5, num_kv_shared_layers=2,
            layer_types=["sliding_attention", "full_attention"] * 2, hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=300, use_bidirectional_attention="vision", final_logit_softcapping=30.0)
# the feature extractor's default 128 mel bins leave 32 = subsampling_conv_channels[0] // 4 after two stride-2 convs
AUDIO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, subsampling_conv_channels=[128, 4],
             attention_chunk_size=4, attention_context_left=5, attention_context_right=0, conv_kernel_size=3,
             output_proj_dims=24)
IMAGE_TOKEN, AUDIO_TOKEN = 290, 293  # hf_reference.media_token_ids(300): image 290, boi, eoi, audio 293, boa, eoa
IMAGES = [(np.random.default_rng(1).random((100, 160, 3)) * 255).astype(np.uint8),  # 60 soft tokens
          (np.random.default_rng(2).random((672, 960, 3)) * 255).astype(np.uint8)]  # resized to 336x480: 70
CLIP = (np.random.default_rng(3).standard_normal(8000) * 0.1).astype(np.float32)  # 0.5 s: 49 frames, 13 soft tokens
PROMPT = [2, 17, IMAGE_TOKEN, 5, 9, AUDIO_TOKEN, 31, IMAGE_TOKEN, 7, 11]

for tool in ("gcc", "g++", "pkg-config"):
    if shutil.which(tool) is None:
        if os.environ.get("CI"):
            raise RuntimeError(f"CI must install {tool} (.ci/run does)")
        pytest.skip(f"needs {tool}", allow_module_level=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    checkpoint = make_multimodal_checkpoint(tmp_path_factory.mktemp("embed_media") / "checkpoint", TEXT, VISION,
                                            audio=AUDIO, seed=5)
    # both processors' settings in one file (each save_pretrained above writes preprocessor_config.json)
    from transformers.models.gemma4 import Gemma4AudioFeatureExtractor, Gemma4ImageProcessorPil

    extractor = {k: v for k, v in Gemma4AudioFeatureExtractor().to_dict().items() if not isinstance(v, np.ndarray)}
    (checkpoint / "processor_config.json").write_text(json.dumps(
        {"image_processor": Gemma4ImageProcessorPil(max_soft_tokens=70).to_dict(), "feature_extractor": extractor}))
    return checkpoint


def compile_artifact(checkpoint: Path, target: str, out: Path) -> Path:
    loaded = load_model(str(checkpoint))
    return compile_model(loaded.cfg, loaded.weights, target, out, embed=True)


@pytest.fixture(scope="module")
def artifact(checkpoint, tmp_path_factory) -> Path:
    return compile_artifact(checkpoint, "llvm", tmp_path_factory.mktemp("art") / "llvm")


@pytest.fixture(scope="module")
def app(artifact, tmp_path_factory) -> Path:
    return build_app(artifact, tmp_path_factory.mktemp("app") / "embed_media")


def build_app(artifact: Path, out: Path) -> Path:
    """The app built the way docs/embedding.md says: cc app.c $(pkg-config --cflags --libs g4c)."""
    env = {**os.environ, "PKG_CONFIG_PATH": str(artifact / "lib" / "pkgconfig")}
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "g4c"], capture_output=True, text=True, env=env,
                           check=True).stdout.split()
    subprocess.run(["gcc", *C_FLAGS, str(APP), "-o", str(out), *flags], check=True, capture_output=True, text=True)
    return out


def run(command: list, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def preprocess(session) -> tuple[list[m.ImageInputs], list[m.AudioInputs]]:
    cfg = m.ProcessorConfig.from_dict(session.media.processor)
    return ([m.preprocess_image(image, cfg.image) for image in IMAGES],
            [m.preprocess_audio(CLIP, cfg.audio, cfg.audio_seq_length)])


def expanded_ids(session, pictures: list[m.ImageInputs], clips: list[m.AudioInputs]) -> np.ndarray:
    return m.expand_prompt(PROMPT, [p.num_soft_tokens for p in pictures], [c.num_soft_tokens for c in clips],
                           m.MediaTokens(**session.media.tokens)).ids


def write_input(path: Path, pictures: list[m.ImageInputs], clips: list[m.AudioInputs], ids, new: int) -> Path:
    """What the app reads: the processor's rows and positions of each image, the valid feature frames of
    each clip, the expanded prompt, n_new."""
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(pictures)))
        for p in pictures:
            f.write(struct.pack("<ii", *p.pixel_values.shape))
            f.write(np.ascontiguousarray(p.pixel_values, "<f4").tobytes())
            f.write(np.ascontiguousarray(p.positions, "<i4").tobytes())
        f.write(struct.pack("<i", len(clips)))
        for c in clips:
            frames = c.features[np.asarray(c.mask, bool)]  # input_features_mask 1: the clip's own frames
            f.write(struct.pack("<ii", *frames.shape) + np.ascontiguousarray(frames, "<f4").tobytes())
        f.write(struct.pack("<i", len(ids)) + np.asarray(ids, "<i4").tobytes() + struct.pack("<i", new))
    return path


def read_output(path: Path, count: int, hidden: int, vocab: int) -> tuple[list[np.ndarray], np.ndarray]:
    data, at, rows = path.read_bytes(), 0, []
    for _ in range(count):
        (n,) = struct.unpack_from("<i", data, at)
        rows.append(np.frombuffer(data, "<f4", n * hidden, at + 4).reshape(n, hidden))
        at += 4 + 4 * n * hidden
    return rows, np.frombuffer(data, "<f4", vocab, at)


def test_c_runtime_encodes_and_prefills_media_as_python(artifact, app, tmp_path):
    check_media_prompt(artifact, app, tmp_path)
    # what a CUDA artifact's library does, on the CPU: inputs copied into TVM runtime tensors
    done = run([app, "run", artifact, tmp_path / "in.bin", tmp_path / "device.bin", CHUNK], G4C_RUNTIME_MEMORY="1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "device.bin").read_bytes() == (tmp_path / "out.bin").read_bytes()
    assert done.stdout == run([app, "run", artifact, tmp_path / "in.bin", tmp_path / "host.bin", CHUNK]).stdout


def check_media_prompt(artifact: Path, app: Path, tmp_path: Path) -> None:
    session = load(artifact, prefill_chunk=CHUNK)
    pictures, clips = preprocess(session)
    assert [p.num_soft_tokens for p in pictures] == [60, 70] and [c.num_soft_tokens for c in clips] == [13]
    ids = expanded_ids(session, pictures, clips)
    done = run([app, "run", artifact, write_input(tmp_path / "in.bin", pictures, clips, ids, NEW_TOKENS),
                tmp_path / "out.bin", CHUNK])
    assert done.returncode == 0, done.stderr[-2000:]
    rows, c_logits = read_output(tmp_path / "out.bin", len(pictures) + len(clips), session.hidden_size,
                                 session.vocab_size)
    expected = [session.encode("image", image_encoder_inputs(p)) for p in pictures] + \
               [session.encode("audio", audio_encoder_inputs(c)) for c in clips]
    for c_rows, python_rows in zip(rows, expected, strict=True):  # the same encoder inputs, the same kernels
        assert c_rows.shape == python_rows.shape and np.abs(c_rows - python_rows).max() <= 1e-6
    logits = session.prefill(PROMPT, images=IMAGES, audio=[CLIP])
    assert session.position == len(ids)
    session.reset()
    all_logits = session.prefill(PROMPT, all_logits=True, images=IMAGES, audio=[CLIP])
    assert all_logits.shape == (len(ids), session.vocab_size)
    assert np.abs(c_logits - logits).max() <= 1e-4 and np.abs(c_logits - all_logits[-1]).max() <= 1e-4
    session.reset()
    python_tokens = session.generate(PROMPT, NEW_TOKENS, images=IMAGES, audio=[CLIP])
    assert [int(t) for t in done.stdout.split(",")] == python_tokens


def test_bad_media_input_returns_codes_and_messages(artifact, app, tmp_path):
    check_bad_input(artifact, app, tmp_path)


def check_bad_input(artifact: Path, app: Path, tmp_path: Path) -> None:
    session = load(artifact)
    pictures, _ = preprocess(session)
    done = run([app, "bad", artifact, write_input(tmp_path / "in.bin", pictures[:1], [], PROMPT, 0)])
    assert done.returncode == 0, done.stderr
    results = {line.split(" ", 1)[0]: line.split(" ", 2)[1:] for line in done.stdout.splitlines()}
    expected = {"rows_too_small": (1, "the image has 60 soft tokens, rows_out holds 59"),
                "padding_row": (1, "leave the processor's padding rows out"),
                "partial_grid": (1, "a full grid of patches"), "same_position": (1, "have the same position"),
                "no_patches": (1, "at least one patch"), "null_rows": (1, "NULL"),
                "audio_too_long": (1, "3001 frames make 751 soft tokens, over this model's 750 per clip"),
                "audio_rows_too_small": (1, "the clip has 3 soft tokens, rows_out holds 2"),
                "no_frames": (1, "at least one frame"), "audio_ok": (0, "ok"),
                "block_too_long": (1, "71 image tokens in a row at 2, over this model's 70 per image"),
                "null_soft_rows": (1, "soft_rows is NULL"), "mask_disagrees": (1, "soft_mask[73] is 1"),
                "mask_agrees": (0, "ok"), "token_outside": (3, "outside the vocabulary"), "null_ids": (1, "NULL"),
                "null_info": (1, "NULL")}
    for case, (code, message) in expected.items():
        assert int(results[case][0]) == code and message in results[case][1], (case, results[case])
    assert results["rows_needed"] == ["0", "60"]  # *n_rows says how many rows the image needs
    assert results["audio_rows_needed"] == ["751"]
    assert results["position"] == ["75"]


def test_media_info_and_text_only_artifacts(artifact, app, tmp_path):
    done = run([app, "info", artifact])
    assert done.returncode == 0, done.stderr
    info = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    media = json.loads((artifact / "manifest.json").read_text())["media"]
    assert (info["has_image"], info["has_audio"], info["hidden_size"], info["bidirectional_vision"]) == \
        ("1", "1", "48", "1")
    tokens = ("image", "boi", "eoi", "audio", "boa", "eoa")
    assert [int(info[f"{t}_token_id"]) for t in (*tokens, "pad")] == \
        [*(media["tokens"][t] for t in tokens), media["pad_token_id"]]
    image = media["processor"]["image"]
    assert [int(info[k]) for k in ("patch_size", "pooling_kernel_size", "max_soft_tokens")] == \
        [image["patch_size"], image["pooling_kernel_size"], image["max_soft_tokens"]]
    assert float(info["rescale_factor"]) == image["rescale_factor"] and info["image_std"] == "1,1,1"
    audio = media["processor"]["audio"]
    assert [int(info[k]) for k in ("sampling_rate", "n_mels", "audio_seq_length")] == \
        [audio["sampling_rate"], audio["feature_size"], media["processor"]["audio_seq_length"]]
    assert json.loads(info["processor"]) == media["processor"]
    assert info["encode_audio"] == "0 ok"
    assert info["encode_image"].startswith("1 g4c_encode_image: the 1 positions span")
    assert info["prefill_media"] == "0 ok"  # a prompt without images through the media prefill
    assert {"HIDDEN_SIZE 48", "HAS_IMAGE 1", "HAS_AUDIO 1", "IMAGE_TOKEN_ID 290", "EOA_TOKEN_ID 295",
            "MAX_SOFT_TOKENS 70"} <= macros(artifact)
    text = tmp_path / "text"
    assert main(["compile", "tiny-dense", "--random-weights", "-o", str(text), "--no-check"]) == 0  # with its C runtime
    done = run([build_app(text, tmp_path / "text_app"), "info", text])
    assert done.returncode == 0, done.stderr
    info = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert (info["has_image"], info["image_token_id"], info["patch_size"], info["processor"]) == ("0", "-1", "0", "{}")
    assert info["encode_image"] == "1 this model is text-only: it has no image encoder"
    assert info["encode_audio"] == "1 this model is text-only: it has no audio encoder"
    assert info["prefill_media"].startswith("1 this model is text-only (its checkpoint has no vision or audio")
    assert {"HAS_IMAGE 0", "HAS_AUDIO 0", "IMAGE_TOKEN_ID -1"} <= macros(text)


def macros(artifact: Path) -> set[str]:
    """"NAME VALUE" of each G4C_MODEL_NAME in the artifact's g4c_model.h."""
    return {" ".join(line.split()[1:3]).removeprefix("G4C_MODEL_")
            for line in (artifact / "include" / "g4c_model.h").read_text().splitlines() if line.startswith("#define")}



def _vulkan_device() -> bool:
    try:
        import wgpu

        return wgpu.gpu.request_adapter_sync(power_preference="high-performance") is not None
    except Exception:  # noqa: BLE001 - no wgpu, no wgpu-native, no driver
        return False


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CI") and not _vulkan_device(),
                    reason="needs wgpu and a Vulkan device (mesa-vulkan-drivers)")
def test_vulkan_c_runtime_encodes_and_prefills_media_as_python(checkpoint, tmp_path):
    """The wgpu executor: the encoders' and the media prefill's inputs and symbolic sizes (T, S, the
    audio convolution's frames) through WGSL kernels (lavapipe here)."""
    art = compile_artifact(checkpoint, "vulkan", tmp_path / "vulkan")
    app = build_app(art, tmp_path / "embed_media")
    check_media_prompt(art, app, tmp_path)
    check_bad_input(art, app, tmp_path)
