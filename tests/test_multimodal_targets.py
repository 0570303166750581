"""Images and audio in the prompt on the other targets: a tiny multimodal checkpoint
(Gemma4ForConditionalGeneration with a vision tower, bidirectional image blocks, and an audio tower)
compiled for Vulkan (run through wgpu) and ARM (run in an RPC server under qemu-aarch64) matches the
reference interpreter on an image + audio prompt; CUDA and Metal artifacts compile with both encoders
and the media prefills. Tools that are absent skip their tests, as in
test_vulkan.py, test_arm.py, test_cuda.py; CI must have them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hf_reference import VISION, make_multimodal_checkpoint
from test_audio_compiled import AUDIO, CLIP

from g4c.compiler import compile_model
from g4c.model import load_model
from g4c.reference import ReferenceSession
from g4c.runtime import load
from g4c.runtime.session import ArtifactSession

ROOT = Path(__file__).resolve().parents[1]
IMAGE = (np.random.default_rng(0).random((100, 160, 3)) * 255).astype(np.uint8)  # 60 soft tokens
PROMPT = [2, 17, 290, 5, 293, 9]  # 290: the image placeholder, 293: the audio placeholder
MEDIA = dict(images=[IMAGE], audio=[CLIP])
NEW_TOKENS = 8
os.environ.setdefault("WGPU_BACKEND_TYPE", "Vulkan")


def _require(ok: bool, what: str) -> None:
    if not ok:
        if os.environ.get("CI"):
            raise RuntimeError(f"CI must provide {what}")
        pytest.skip(f"needs {what}")


def _vulkan_adapter():
    try:
        import wgpu

        return wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    except Exception:  # noqa: BLE001 - no wgpu-native library, no driver
        return None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """4 text layers (sliding/full, KV sharing, PLE, bidirectional image blocks), a 2-layer vision tower,
    a 2-layer audio tower (special ids 290..295: image 290, audio 293)."""
    text = dict(vocab_size=300, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=1, head_dim=12, global_head_dim=24, sliding_window=5, num_kv_shared_layers=2,
                layer_types=["sliding_attention", "full_attention"] * 2, hidden_size_per_layer_input=8,
                vocab_size_per_layer_input=300, use_bidirectional_attention="vision", final_logit_softcapping=30.0)
    return make_multimodal_checkpoint(tmp_path_factory.mktemp("mm_targets") / "ckpt", text, VISION, AUDIO, seed=0)


@pytest.fixture(scope="module")
def expected(checkpoint) -> tuple[np.ndarray, list[int]]:
    """The reference interpreter's logits of PROMPT with IMAGE and CLIP (one row per expanded position) and
    its greedy tokens."""
    loaded = load_model(str(checkpoint))
    session = ReferenceSession(loaded.cfg, loaded.weights, media=loaded.weights.media)
    logits = session.prefill(PROMPT, all_logits=True, **MEDIA)
    session.reset()
    return logits, session.generate(PROMPT, NEW_TOKENS, **MEDIA)


def _compile(checkpoint: Path, target: str, directory: Path) -> Path:
    loaded = load_model(str(checkpoint))
    return compile_model(loaded.cfg, loaded.weights, target, directory / target.replace(":", "_"))


def _check(session: ArtifactSession, expected: tuple[np.ndarray, list[int]]) -> None:
    logits, tokens = expected
    assert np.abs(session.prefill(PROMPT, all_logits=True, **MEDIA) - logits).max() <= 1e-4
    session.reset()
    assert session.generate(PROMPT, NEW_TOKENS, **MEDIA) == tokens


def test_vulkan_media_prompt_matches_reference(checkpoint, expected, tmp_path):
    """The encoder's two symbolic sizes (patches T, soft tokens S) and the media prefill's extra inputs
    go through the wgpu executor's launch records."""
    _require(_vulkan_adapter() is not None, "a Vulkan device (apt-get install mesa-vulkan-drivers) and wgpu")
    artifact = _compile(checkpoint, "vulkan", tmp_path)
    session = load(artifact)
    assert "Vulkan" in session.executor.device_name
    _check(session, expected)
    chunked = load(artifact, prefill_chunk=2)  # 2-token chunks around the image's one 62-token chunk
    assert np.abs(chunked.prefill(PROMPT, all_logits=True, **MEDIA) - expected[0]).max() <= 1e-4


def test_arm_media_prompt_over_rpc_in_qemu_matches_reference(checkpoint, expected, tmp_path):
    """The host preprocesses the media; the aarch64 encoders and prefills run in g4c's RPC server under qemu."""
    _require(all(shutil.which(t) for t in ("qemu-aarch64", "aarch64-linux-gnu-gcc")),
             "qemu-aarch64 and aarch64-linux-gnu-gcc (apt-get install qemu-user gcc-aarch64-linux-gnu)")
    from rpc_farm import free_port
    from test_rpc import start_server

    from g4c.runtime.remote import remote_executor

    artifact = _compile(checkpoint, "arm", tmp_path)
    port = free_port()
    server = start_server([str(ROOT / "scripts" / "arm-emu.sh"), "python", "-m", "g4c.runtime.rpc_server"], port,
                          sessions=1)
    try:
        _check(ArtifactSession(artifact, remote_executor(f"127.0.0.1:{port}"), max_context=128), expected)
    finally:  # the session was dropped with _check's frame: the server ends after its one session
        server.wait(timeout=120)
    assert server.returncode == 0


@pytest.mark.parametrize("target", ["cuda:sm_90", "metal"])
def test_gpu_targets_compile_the_encoders_and_media_prefills(target, checkpoint, tmp_path):
    if target.startswith("cuda"):
        _require(shutil.which("nvcc") is not None, "nvcc (the CUDA toolkit, or pip install nvidia-cuda-nvcc)")
    manifest = json.loads((_compile(checkpoint, target, tmp_path) / "manifest.json").read_text())
    programs = manifest["programs"]
    assert {"encode_image", "encode_audio", "prefill_media", "prefill_all_media"} <= set(programs)
    assert list(programs["encode_image"]["outputs"]) == list(programs["encode_audio"]["outputs"]) == ["embeddings"]
    assert programs["encode_image"]["inputs"][-1][:2] == ["pool", ["S", 9]]  # soft tokens: a second symbolic size
    assert [n for n, _, _ in programs["prefill_media"]["inputs"]] == ["ids", "positions", "soft", "soft_mask", "reach"]
    ops = {spec["op"] for spec in manifest["kernels"].values()}
    assert {"pool_rows", "where_rows", "head_norm_rope", "conv2d", "local_attention"} <= ops
