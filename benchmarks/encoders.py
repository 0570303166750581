"""Encoding an image and an audio clip with E2B-sized towers (random weights): g4c's compiled
`encode_image` / `encode_audio` against transformers' `Gemma4Model.get_image_features` /
`get_audio_features` (fp32, eager), same threads, same inputs, best of `--rounds`.

The towers are transformers' `Gemma4VisionConfig` / `Gemma4AudioConfig` defaults (the E2B towers); the
text decoder is a 1-layer stand-in with the E2B width (1536), since only its width reaches the towers
(the soft tokens are projected into it). The image is a random 768×768 photo-sized array (280 soft
tokens, 2520 patches), the clip 10 s of noise at 16 kHz (250 soft tokens). Preprocessing (g4c.media vs
transformers' processors) is timed separately.

    python benchmarks/encoders.py [--threads 2 --rounds 3 --target llvm]

Writes benchmarks/results/encoders-HOST.json and the "Encoders" section of benchmarks/RESULTS.md
(`compare.py` keeps that section when it rewrites the file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- encoders: written by benchmarks/encoders.py -->", "<!-- /encoders -->"
TEXT = dict(vocab_size=1024, hidden_size=1536, intermediate_size=256, num_hidden_layers=1, num_attention_heads=8,
            num_key_value_heads=1, head_dim=256, global_head_dim=512, layer_types=["full_attention"],
            hidden_size_per_layer_input=0)
TOKENS = dict(image_token_id=1000, boi_token_id=1001, eoi_token_id=1002, audio_token_id=1003, boa_token_id=1004,
              eoa_token_index=1005)


def checkpoint(directory: Path) -> Path:
    """An E2B-tower `Gemma4ForConditionalGeneration` with random weights and its processor settings."""
    import torch
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration
    from transformers.models.gemma4 import Gemma4AudioConfig, Gemma4VisionConfig

    torch.manual_seed(0)
    config = Gemma4Config(text_config=TEXT, vision_config=Gemma4VisionConfig().to_dict(),
                          audio_config=Gemma4AudioConfig().to_dict(), **TOKENS)
    Gemma4ForConditionalGeneration(config).save_pretrained(directory)
    write_processor_config(directory)
    return directory


def write_processor_config(directory: Path) -> None:
    """Both processors' settings in one processor_config.json, as Gemma4Processor writes them."""
    from transformers.models.gemma4 import Gemma4AudioFeatureExtractor, Gemma4ImageProcessorPil

    sections = {"image_processor": json.loads(Gemma4ImageProcessorPil(max_soft_tokens=280).to_json_string()),
                "feature_extractor": json.loads(Gemma4AudioFeatureExtractor().to_json_string())}
    (directory / "processor_config.json").write_text(json.dumps(sections))


def best(fn, rounds: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def measure(directory: Path, artifact: Path, rounds: int) -> dict:
    import numpy as np
    import torch
    from transformers import Gemma4ForConditionalGeneration
    from transformers.models.gemma4 import Gemma4AudioFeatureExtractor, Gemma4ImageProcessorPil

    import g4c
    from g4c import media
    from g4c.runtime.media import audio_encoder_inputs, image_encoder_inputs

    rng = np.random.default_rng(0)
    image = (rng.random((768, 768, 3)) * 255).astype(np.uint8)
    clip = (rng.standard_normal(160_000) * 0.1).astype(np.float32)
    hf_image, hf_audio = Gemma4ImageProcessorPil.from_pretrained(directory), Gemma4AudioFeatureExtractor.from_pretrained(directory)
    processor = media.ProcessorConfig.from_directory(directory)
    out: dict = {}
    out["prep_image_hf"], hf_pixels = best(lambda: hf_image(image, return_tensors="pt"), rounds)
    out["prep_image_g4c"], pixels = best(lambda: media.preprocess_image(image, processor.image), rounds)
    out["prep_audio_hf"], hf_feats = best(lambda: hf_audio([clip], return_tensors="pt"), rounds)
    out["prep_audio_g4c"], feats = best(lambda: media.preprocess_audio(clip, processor.audio), rounds)

    model = Gemma4ForConditionalGeneration.from_pretrained(directory, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    with torch.no_grad():
        out["image_hf"], ref_image = best(lambda: model.model.get_image_features(
            hf_pixels["pixel_values"], hf_pixels["image_position_ids"]).pooler_output[0].numpy(), rounds)
        out["audio_hf"], ref_audio = best(lambda: model.model.get_audio_features(
            hf_feats["input_features"], hf_feats["input_features_mask"]), rounds)
    valid = ref_audio.attention_mask[0].numpy().astype(bool)
    ref_audio = ref_audio.pooler_output[0].numpy()[valid]
    model = None  # free its weights before g4c loads the artifact

    session = g4c.load(artifact)
    image_inputs, audio_inputs = image_encoder_inputs(pixels), audio_encoder_inputs(feats)
    session.encode("image", image_inputs)  # first call: the VM's memory pool
    out["image_g4c"], ours_image = best(lambda: session.encode("image", image_inputs), rounds)
    session.encode("audio", audio_inputs)
    out["audio_g4c"], ours_audio = best(lambda: session.encode("audio", audio_inputs), rounds)
    out["image_max_abs_diff"] = float(np.abs(ours_image - ref_image).max())
    out["audio_max_abs_diff"] = float(np.abs(ours_audio - ref_audio).max())
    out["image_tokens"], out["image_patches"] = int(ours_image.shape[0]), int(pixels.pixel_values.shape[0])
    out["audio_tokens"], out["audio_frames"] = int(ours_audio.shape[0]), int(audio_inputs["features"].shape[0])
    return out


def section(r: dict) -> str:
    m = r["results"]
    rows = [BEGIN, "", "## Encoders: an image and an audio clip, E2B-sized towers", "",
            f"{r['machine']}, {r['threads']} threads, target {r['target']}, best of {r['rounds']}; random weights "
            f"(transformers' Gemma4VisionConfig / Gemma4AudioConfig defaults). Image: 768×768 → "
            f"{m['image_patches']} patches → {m['image_tokens']} soft tokens; audio: 10 s at 16 kHz → "
            f"{m['audio_frames']} mel frames → {m['audio_tokens']} soft tokens. Compile time of the artifact: "
            f"{r['compile_seconds']:.0f} s.", "",
            "| step | transformers fp32 eager (ms) | g4c (ms) | speed-up | max abs Δ vs transformers |",
            "|---|---|---|---|---|"]
    for label, key, diff in (("encode image", "image", "image_max_abs_diff"), ("encode audio", "audio", "audio_max_abs_diff"),
                             ("preprocess image", "prep_image", None), ("preprocess audio", "prep_audio", None)):
        hf, ours = m[f"{key}_hf"] * 1e3, m[f"{key}_g4c"] * 1e3
        rows.append(f"| {label} | {hf:.1f} | {ours:.1f} | ×{hf / ours:.2f} | {m[diff]:.2e} |" if diff else
                    f"| {label} | {hf:.1f} | {ours:.1f} | ×{hf / ours:.2f} | exact |")
    return "\n".join(rows + ["", END, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--target", default="llvm")
    parser.add_argument("--workdir", type=Path, default=None, help="Keep the checkpoint and artifact here.")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before the TVM runtime starts its pool
    import torch

    torch.set_num_threads(args.threads)
    from g4c.compiler import compile_model
    from g4c.model import load_model

    work = args.workdir or Path(tempfile.mkdtemp(prefix="g4c-encoders-"))
    directory = work / "checkpoint"
    if not (directory / "config.json").is_file():
        checkpoint(directory)
    elif not (directory / "processor_config.json").is_file():
        write_processor_config(directory)
    loaded = load_model(str(directory))
    t0 = time.perf_counter()
    artifact = compile_model(loaded.cfg, loaded.weights, args.target, work / f"artifact-{args.target}", overwrite=True)
    compile_seconds = time.perf_counter() - t0
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
               "threads": args.threads, "rounds": args.rounds, "target": args.target,
               "compile_seconds": compile_seconds, "results": measure(directory, artifact, args.rounds)}
    out = HERE / "results" / f"encoders-{platform.node()}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    text = section(results)
    write_section(text, HERE / "RESULTS.md")
    print(text)


def write_section(text: str, path: Path) -> None:
    """Replace this script's section of RESULTS.md (between its markers), or append it."""
    import re

    old = path.read_text() if path.is_file() else ""
    old = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END) + r"\n?", "", old, flags=re.S).rstrip() + "\n\n"
    path.write_text(old + text)


if __name__ == "__main__":
    main()
