"""Audio in the prompt, end to end: g4c against transformers' `Gemma4ForConditionalGeneration` (float64)
on the reference interpreter, and a compiled llvm artifact against the reference, for one clip and for
an image and a clip in one prompt.

The checkpoint is an E-type text model with a tiny vision tower and a tiny audio tower (2 conformer
layers; `subsampling_conv_channels[0]` = 128 = the feature extractor's default `feature_size`, which
the subsampling's projection ties it to). Every parameter is random; the clippable linears' bounds
are cycled through none (transformers' ±inf, which g4c makes finite), tight and asymmetric, so that
clamping happens. Both processors' settings go into one processor_config.json, as `Gemma4Processor`
writes them (their own save_pretrained would both write preprocessor_config.json).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hf_reference import (FAMILIES, VISION, load_multimodal_reference, media_token_ids, multimodal_inputs,
                          multimodal_logits, randomize_)

import g4c
from g4c.compiler import compile_model
from g4c.model import load_model
from g4c.reference import ReferenceSession

TEXT = FAMILIES["e"]  # the E models are the ones with an audio tower
AUDIO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, subsampling_conv_channels=[128, 4],
             attention_chunk_size=4, attention_context_left=5, attention_context_right=0, conv_kernel_size=3,
             output_proj_dims=24)
BOUNDS = ((-math.inf, math.inf), (-0.5, 0.5), (-0.8, 0.3))
TOKENS = media_token_ids(TEXT["vocab_size"])
AUDIO_ID, IMAGE_ID = TOKENS["audio_token_id"], TOKENS["image_token_id"]


def _waveform(samples: int, seed: int) -> np.ndarray:
    t = np.arange(samples)
    noise = np.random.default_rng(seed).standard_normal(samples)
    return (0.3 * np.sin(t * 0.05 * (1 + seed)) + 0.1 * noise).astype(np.float32)


CLIP, OTHER_CLIP = _waveform(8000, 0), _waveform(8000, 1)  # 0.5 s at 16 kHz: 50 frames, 13 soft tokens
IMAGE = (np.random.default_rng(1).random((100, 160, 3)) * 255).astype(np.uint8)
PROMPTS = {"audio": ([2, 17, AUDIO_ID, 5, 9], [], [CLIP]),
           "image+audio": ([2, IMAGE_ID, 7, AUDIO_ID, 9], [IMAGE], [CLIP])}


def _make_checkpoint(directory: Path, seed: int = 7) -> Path:
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration
    from transformers.models.gemma4 import Gemma4AudioFeatureExtractor, Gemma4ImageProcessorPil
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear

    config = Gemma4Config(text_config=TEXT, vision_config=VISION, audio_config=AUDIO, **TOKENS)
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(config)
    randomize_(model, seed)
    clipped = [m for m in model.modules() if isinstance(m, Gemma4ClippableLinear) and m.use_clipped_linears]
    assert clipped
    with torch.no_grad():
        for i, m in enumerate(clipped):
            (in_lo, in_hi), (out_lo, out_hi) = BOUNDS[i % 3], BOUNDS[(i // 3) % 3]
            for buf, value in zip(("input_min", "input_max", "output_min", "output_max"), (in_lo, in_hi, out_lo, out_hi)):
                getattr(m, buf).fill_(value)
    model.save_pretrained(directory)
    sections = {"image_processor": json.loads(Gemma4ImageProcessorPil(max_soft_tokens=70).to_json_string()),
                "feature_extractor": json.loads(Gemma4AudioFeatureExtractor().to_json_string())}
    (directory / "processor_config.json").write_text(json.dumps(sections))
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _make_checkpoint(tmp_path_factory.mktemp("audio_mm") / "ckpt")


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(str(checkpoint))


@pytest.fixture(scope="module")
def reference(loaded) -> ReferenceSession:
    return ReferenceSession(loaded.cfg, loaded.weights, media=loaded.weights.media)


@pytest.fixture(scope="module")
def artifact(loaded, tmp_path_factory) -> Path:
    return compile_model(loaded.cfg, loaded.weights, "llvm", tmp_path_factory.mktemp("audio_art") / "llvm")


@contextlib.contextmanager
def _float64_everywhere():
    """transformers' fp32 upcasts (`Tensor.float()`, `softmax(dtype=torch.float32)`) go to float64
    instead, for the float64 run only (the audio tower mixes dtypes otherwise, and the run fails)."""
    softmax = torch.nn.functional.softmax

    def keep_float(self, *args, **kwargs):
        return self.to(torch.float64)

    def keep_softmax(x, *args, dtype=None, **kwargs):
        return softmax(x, *args, dtype=None if x.dtype == torch.float64 else dtype, **kwargs)

    with mock.patch.object(torch.Tensor, "float", keep_float), \
            mock.patch.object(torch.nn.functional, "softmax", keep_softmax):
        yield


@pytest.mark.parametrize("case", list(PROMPTS))
def test_reference_logits_match_transformers(case, checkpoint, reference):
    ids, images, clips = PROMPTS[case]
    inputs = multimodal_inputs(checkpoint, ids, images, clips)
    with _float64_everywhere():
        exact = multimodal_logits(load_multimodal_reference(checkpoint, torch.float64), inputs)
    fp32 = multimodal_logits(load_multimodal_reference(checkpoint, torch.float32), inputs)
    tolerance = max(1e-4, 2 * float(np.abs(fp32 - exact).max()))
    reference.reset()
    ours = reference.prefill(ids, all_logits=True, images=images, audio=clips)
    assert ours.shape == exact.shape  # one row per position of the expanded prompt
    err = float(np.abs(ours - exact).max())
    print(f"{case}: g4c reference {err:.2e}, transformers fp32 {float(np.abs(fp32 - exact).max()):.2e}")
    assert err <= tolerance
    reference.reset()  # the clip matters: another one changes the logits well beyond the tolerance
    other = reference.prefill(ids, all_logits=True, images=images, audio=[OTHER_CLIP])
    assert np.abs(other - ours).max() > 100 * tolerance


def test_clamps_bite(loaded):
    """Some checkpoint bounds change values, so the comparisons cover clamping."""
    from g4c.ir import Interpreter
    from g4c.media import ProcessorConfig, preprocess_audio
    from g4c.runtime.media import audio_encoder_inputs

    media = loaded.weights.media
    graph = media.graphs()["encode_audio"]
    cfg = ProcessorConfig.from_dict(media.spec.processor)
    inputs = audio_encoder_inputs(preprocess_audio(CLIP, cfg.audio, cfg.audio_seq_length))
    values = Interpreter(graph, lambda n: np.asarray(media.source.get(n), np.float32)).run(return_all=True, **inputs)
    changed = [n.name for n in graph.nodes if n.op == "clamp" and not np.array_equal(values[n.name],
                                                                                     values[n.inputs[0].name])]
    assert changed


@pytest.mark.parametrize("case", list(PROMPTS))
def test_artifact_matches_reference(case, reference, artifact):
    ids, images, clips = PROMPTS[case]
    session = g4c.load(artifact)
    reference.reset()
    expected = reference.prefill(ids, all_logits=True, images=images, audio=clips)
    got = session.prefill(ids, all_logits=True, images=images, audio=clips)
    err = float(np.abs(got - expected).max())
    print(f"{case}: llvm artifact vs reference {err:.2e}")
    assert got.shape == expected.shape and err <= 1e-4
    session.reset()
    reference.reset()
    assert session.generate(ids, 8, images=images, audio=clips) == reference.generate(ids, 8, images=images,
                                                                                         audio=clips)


def test_artifact_encoder_programs(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    program = manifest["programs"]["encode_audio"]
    assert [name for name, _, _ in program["inputs"]] == ["features", "conv0_frames", "frames"]
    recipes = manifest["weight_recipes"]
    assert {"rel_positions", "softplus", "reshape"} <= {kind for r in recipes.values() for kind in r}
    ops = {spec["op"] for spec in manifest["kernels"].values()}
    assert {"conv2d", "layer_norm", "local_attention", "depthwise_conv1d", "glu", "clamp", "add_channels",
            "mul_channels"} <= ops


@pytest.mark.parametrize("samples", [400, 1600, 1601, 4321, 8000, 16000])
def test_soft_token_count_is_the_encoder_rows(samples, checkpoint, loaded, reference, artifact):
    """What the processor inserts (g4c's and transformers' count), the encoder's rows (the reference and
    the artifact) and transformers' audio mask agree, clip by clip."""
    from transformers.models.gemma4 import Gemma4AudioFeatureExtractor

    from g4c.media import ProcessorConfig, preprocess_audio
    from g4c.runtime.media import audio_encoder_inputs

    wave = _waveform(samples, seed=samples)
    cfg = ProcessorConfig.from_directory(checkpoint)
    clip = preprocess_audio(wave, cfg.audio, cfg.audio_seq_length)
    inputs = audio_encoder_inputs(clip)
    assert inputs["frames"].size == clip.num_soft_tokens > 0
    rows = reference.encode("audio", inputs)
    assert rows.shape == (clip.num_soft_tokens, loaded.cfg.hidden_size)
    np.testing.assert_allclose(g4c.load(artifact).encode("audio", inputs), rows, rtol=0, atol=1e-5)

    hf = Gemma4AudioFeatureExtractor.from_pretrained(checkpoint)([wave], return_tensors="pt")
    tokens = multimodal_inputs(checkpoint, [AUDIO_ID], clips=[wave])["input_ids"][0]
    assert int((tokens == AUDIO_ID).sum()) == clip.num_soft_tokens
    model = load_multimodal_reference(checkpoint, torch.float32)
    with torch.no_grad():
        out = model.model.audio_tower(hf["input_features"], hf["input_features_mask"])
    assert int(out.attention_mask.sum()) == clip.num_soft_tokens


def test_weight_recipes_are_the_interpreter_ops():
    from g4c.artifact import derived_shape, derived_weight
    from g4c.ir.interpreter import KERNELS

    w = np.array([-30.0, -1.5, 0.0, 0.7, 25.0, 100.0], np.float32)
    recipes = {"sp": {"softplus": "w"}, "rel": {"rel_positions": [13, 32]}, "s": {"reshape": ["z", [1]]}}
    base = {"w": w, "z": np.array(2.5, np.float32)}.__getitem__
    np.testing.assert_array_equal(derived_weight("sp", recipes, base), KERNELS["softplus"](w))
    np.testing.assert_array_equal(derived_weight("rel", recipes, base), KERNELS["rel_positions"](count=13, dim=32))
    assert derived_weight("s", recipes, base).shape == (1,) == derived_shape("s", recipes, lambda n: ())
    assert derived_shape("rel", recipes, None) == (13, 32) and derived_shape("sp", recipes, {"w": (6,)}.get) == (6,)


def test_channel_kernels_and_one_element_clamp_bounds():
    """The kernels this lowering adds to `codegen.audio_kernels` against the interpreter's ops."""
    import tvm

    from g4c.codegen import audio_kernels as ak
    from g4c.ir.interpreter import KERNELS

    def run(func, args, shape):
        kernel = tvm.compile(tvm.IRModule({"main": func}), target="llvm")["main"]
        out = tvm.runtime.tensor(np.zeros(shape, np.float32), tvm.cpu())
        kernel(*[tvm.runtime.tensor(np.array(a, order="C"), tvm.cpu()) for a in args], out)
        return out.numpy()

    rng = np.random.default_rng(3)
    for op, shape in (("add_channels", ("T", 24)), ("mul_channels", ("T", 4, 8))):
        func = getattr(ak, op)(shape, name=op)
        w = rng.standard_normal(shape[-1]).astype(np.float32)
        for t in (1, 7):
            x = rng.standard_normal((t, *shape[1:])).astype(np.float32)
            np.testing.assert_allclose(run(func, [x, w], x.shape), KERNELS[op](x, w), rtol=1e-6, atol=1e-6)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    lo, hi = np.array([-0.5], np.float32), np.array([0.3], np.float32)
    got = run(ak.clamp(("T", 16), name="clamp", bounds=(1,)), [x, lo, hi], x.shape)
    np.testing.assert_array_equal(got, KERNELS["clamp"](x, lo[0], hi[0]))


def _wav(path: Path, rate: int = 16000, body: bytes | None = None) -> Path:
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((CLIP * 20000).astype("<i2").tobytes())
    if body is not None:  # a damaged file: its header, then garbage
        path.write_bytes(path.read_bytes()[:20] + body)
    return path


@pytest.mark.parametrize("problem", ["corrupt", "44.1kHz", "missing", "two-placeholders"])
def test_bad_audio_input_fails_in_one_line(problem, artifact, tmp_path, capsys):
    """A damaged WAV, another sample rate (refused, not resampled), a missing file, more placeholders
    than clips: one line on stderr, non-zero exit."""
    from g4c.cli import main

    clip, ids = _wav(tmp_path / "clip.wav"), f"2,{AUDIO_ID},5"
    expected = {"corrupt": "clip.wav", "44.1kHz": "44100 Hz", "missing": "no such file",
                "two-placeholders": "placeholders"}[problem]
    if problem == "corrupt":
        _wav(clip, body=b"\x00garbage")
    elif problem == "44.1kHz":
        _wav(clip, rate=44100)
    elif problem == "missing":
        clip = tmp_path / "nope.wav"
    else:
        ids = f"2,{AUDIO_ID},5,{AUDIO_ID}"
    code = main(["generate", str(artifact), "--tokens", ids, "--audio", str(clip), "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and expected in err[0], err
