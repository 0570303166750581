"""Images in the prompt: g4c against transformers' `Gemma4ForConditionalGeneration` (run in float64),
on the reference interpreter and on a compiled llvm artifact, for one image, two images (one resized)
and both mask rules (causal; `use_bidirectional_attention="vision"`: an image's soft tokens see their
whole block on sliding layers); chunked prefill never splits a block; bad input fails in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_reference import (FAMILIES, VISION, load_multimodal_reference, make_multimodal_checkpoint, media_token_ids,
                          multimodal_greedy, multimodal_inputs, multimodal_logits)

import g4c
from g4c.cli import main
from g4c.compiler import compile_model
from g4c.model import load_model
from g4c.reference import ReferenceSession

DENSE = dict(FAMILIES["dense"], use_bidirectional_attention="vision")  # 31B-type: image blocks bidirectional
TEXTS = {"e": FAMILIES["e"], "bidir": DENSE}


def _image(height: int, width: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


SMALL, LARGE = _image(100, 160, 1), _image(333, 517, 2)  # LARGE exceeds the 70-token budget: it is resized


def _prompt(kind: str, images: int) -> list[int]:
    image = media_token_ids(TEXTS[kind]["vocab_size"])["image_token_id"]
    return [2, 17, image, 5, 9] if images == 1 else [2, image, 7, 31, image, 9]


@pytest.fixture(scope="module")
def mm_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mm")
    return {kind: make_multimodal_checkpoint(root / kind, text, VISION, seed=i + 3)
            for i, (kind, text) in enumerate(TEXTS.items())}


@pytest.fixture(scope="module")
def mm_artifacts(mm_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("mm_art")
    out = {}
    for kind, path in mm_checkpoints.items():
        loaded = load_model(str(path))
        out[kind] = compile_model(loaded.cfg, loaded.weights, "llvm", root / kind)
    return out


def _reference_session(path) -> ReferenceSession:
    loaded = load_model(str(path))
    return ReferenceSession(loaded.cfg, loaded.weights, media=loaded.weights.media)


def _tolerance_and_exact(path, ids, images) -> tuple[float, np.ndarray]:
    """transformers in float64 (the exact answer) and the tolerance: max(1e-4, 2× its fp32 error)."""
    inputs = multimodal_inputs(path, ids, images)
    exact = multimodal_logits(load_multimodal_reference(path, torch.float64), inputs)
    fp32 = multimodal_logits(load_multimodal_reference(path, torch.float32), inputs)
    return max(1e-4, 2 * float(np.abs(fp32 - exact).max())), exact


CASES = [("e", 1), ("bidir", 1), ("e", 2), ("bidir", 2)]


@pytest.mark.parametrize("kind,count", CASES, ids=[f"{k}-{n}img" for k, n in CASES])
def test_reference_logits_match_transformers(kind, count, mm_checkpoints):
    path, images = mm_checkpoints[kind], [SMALL, LARGE][:count]
    tolerance, exact = _tolerance_and_exact(path, _prompt(kind, count), images)
    ours = _reference_session(path).prefill(_prompt(kind, count), all_logits=True, images=images)
    assert ours.shape == exact.shape  # one row per position of the expanded prompt
    assert np.abs(ours - exact).max() <= tolerance


@pytest.mark.parametrize("kind,count", CASES, ids=[f"{k}-{n}img" for k, n in CASES])
def test_compiled_logits_match_transformers(kind, count, mm_checkpoints, mm_artifacts):
    path, images = mm_checkpoints[kind], [SMALL, LARGE][:count]
    tolerance, exact = _tolerance_and_exact(path, _prompt(kind, count), images)
    ours = g4c.load(mm_artifacts[kind]).prefill(_prompt(kind, count), all_logits=True, images=images)
    assert np.abs(ours - exact).max() <= tolerance


@pytest.mark.parametrize("kind", ["e", "bidir"])
def test_greedy_tokens_match_transformers(kind, mm_checkpoints, mm_artifacts):
    path, images, ids = mm_checkpoints[kind], [SMALL, LARGE], _prompt(kind, 2)
    expected = multimodal_greedy(load_multimodal_reference(path, torch.float32), multimodal_inputs(path, ids, images), 12)
    assert _reference_session(path).generate(ids, 12, images=images) == expected
    assert g4c.load(mm_artifacts[kind]).generate(ids, 12, images=images) == expected


def test_chunks_never_split_an_image_block(mm_artifacts):
    """Chunks of 8 tokens around 60-token bidirectional blocks: each block runs as one chunk (the
    sliding rings are sized for it) and the logits equal a single-chunk prefill."""
    ids, images = _prompt("bidir", 2), [SMALL, LARGE]
    whole = g4c.load(mm_artifacts["bidir"], prefill_chunk=512).prefill(ids, all_logits=True, images=images)
    chunked = g4c.load(mm_artifacts["bidir"], prefill_chunk=8).prefill(ids, all_logits=True, images=images)
    assert np.abs(whole - chunked).max() <= 1e-5


def test_preprocessed_images_are_taken_as_they_are(mm_artifacts, mm_checkpoints):
    """`g4c.media.ImageInputs` made elsewhere (an app, a device without Pillow) give the same logits."""
    from g4c import media

    session = g4c.load(mm_artifacts["e"])
    config = media.ProcessorConfig.from_dict(session.media.processor).image
    ids, images = _prompt("e", 2), [SMALL, LARGE]
    raw = session.prefill(ids, all_logits=True, images=images)
    session.reset()
    ready = session.prefill(ids, all_logits=True, images=[media.preprocess_image(i, config) for i in images])
    np.testing.assert_array_equal(raw, ready)


def test_text_prompt_after_an_image_prompt_is_plain_text(mm_artifacts, mm_checkpoints):
    """A multimodal artifact still runs text-only prompts through its text programs."""
    ids = [2, 17, 99, 5, 8, 1, 44]
    reference = _reference_session(mm_checkpoints["e"]).prefill(ids, all_logits=True)
    assert np.abs(g4c.load(mm_artifacts["e"]).prefill(ids, all_logits=True) - reference).max() <= 1e-4


def test_cli_logits_and_generate_with_an_image(mm_checkpoints, mm_artifacts, tmp_path, capsys):
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.fromarray(SMALL).save(photo)
    ids = ",".join(map(str, _prompt("e", 1)))
    assert main(["logits", str(mm_checkpoints["e"]), "--tokens", ids, "--image", str(photo),
                 "-o", str(tmp_path / "ref.npy")]) == 0
    assert main(["logits", str(mm_artifacts["e"]), "--tokens", ids, "--image", str(photo),
                 "-o", str(tmp_path / "art.npy")]) == 0
    ref, art = np.load(tmp_path / "ref.npy"), np.load(tmp_path / "art.npy")
    assert ref.shape == (66, TEXTS["e"]["vocab_size"]) and np.abs(ref - art).max() <= 1e-4
    capsys.readouterr()
    assert main(["generate", str(mm_artifacts["e"]), "--tokens", ids, "--image", str(photo),
                 "--max-new-tokens", "5"]) == 0
    new = [int(t) for t in capsys.readouterr().out.strip().splitlines()[-1].split(",")]
    assert new == _reference_session(mm_checkpoints["e"]).generate(_prompt("e", 1), 5, images=[SMALL])


@pytest.mark.parametrize("problem", ["missing", "corrupt", "extra-placeholder", "no-placeholder", "text-only",
                                     "audio-on-vision-only"])
def test_bad_media_input_fails_in_one_line(problem, mm_artifacts, checkpoints, tmp_path, capsys):
    from PIL import Image

    photo, corrupt = tmp_path / "photo.png", tmp_path / "corrupt.png"
    Image.fromarray(SMALL).save(photo)
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    image_id = media_token_ids(TEXTS["e"]["vocab_size"])["image_token_id"]
    model, ids, media = str(mm_artifacts["e"]), f"2,{image_id},5", ["--image", str(photo)]
    expected = {"missing": "no such file", "corrupt": "not a readable image", "extra-placeholder": "placeholders",
                "no-placeholder": "placeholders", "text-only": "text-only", "audio-on-vision-only": "no audio encoder"}
    if problem == "missing":
        media = ["--image", str(tmp_path / "nope.png")]
    elif problem == "corrupt":
        media = ["--image", str(corrupt)]
    elif problem == "extra-placeholder":
        ids = f"2,{image_id},5,{image_id}"
    elif problem == "no-placeholder":
        ids = "2,5"
    elif problem == "text-only":
        model = str(checkpoints["e"])
    else:
        wav = tmp_path / "clip.wav"
        _write_wav(wav)
        media = ["--audio", str(wav)]
    code = main(["generate", model, "--tokens", ids, *media, "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and expected[problem] in err[0], err


def _write_wav(path) -> None:
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.sin(np.arange(8000) / 7) * 2000).astype("<i2").tobytes())
