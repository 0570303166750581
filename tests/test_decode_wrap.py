"""Ring buffers wrapping during *decode*, on every executor that runs here.

A sliding layer's ring holds window + prefill_chunk − 1 slots. With the default chunk (64) the other
parity tests never fill one, so they never see a decode step overwrite the oldest slot. Here the
prompt is prefilled in chunks of 2 (rings of window + 1 slots) and decode then runs far more steps than
window + chunk, so every ring wraps several times — in producer layers and in the KV-sharing layers
that read them. Each executor must give transformers' logits at every decode step (≤ 1e-4, teacher
forced on transformers' greedy tokens) and its greedy tokens: the Relax VM here (numpy buffers and
runtime tensors, the GPU code path on the CPU), static decode (CUDA's whole-cache form), wgpu on
Vulkan (lavapipe), a compiler-free RPC server, and (slow) the ARM artifact under qemu."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest
from conftest import PROMPT, compile_families
from hf_reference import reference_greedy, reference_logits

from g4c.runtime import ArtifactSession, load

CHUNK = 2
PROMPT3 = PROMPT[:3]
NEW = 24  # 23 decode steps after the prompt's 3 positions; windows are 4-6, rings 5-7 slots
os.environ.setdefault("WGPU_BACKEND_TYPE", "Vulkan")


@pytest.fixture(scope="module")
def expected(references):
    """family → (greedy tokens, logits of PROMPT3 + tokens[:-1]) from transformers."""
    out = {}
    for family in ("e", "moe", "dense", "unified"):
        tokens = reference_greedy(references[family], PROMPT3, NEW)
        out[family] = tokens, reference_logits(references[family], PROMPT3 + tokens[:-1])
    return out


def check_decode_wraps(session: ArtifactSession, tokens: list[int], logits: np.ndarray) -> None:
    rings = [shape[0] for slot, shape in session.cache_shapes.items() if session.manifest.kv_slots[slot].ring]
    window = session.config["sliding_window"]
    assert rings and set(rings) == {window + CHUNK - 1}
    assert len(tokens) - 1 > window + CHUNK and len(PROMPT3) + len(tokens) > 3 * max(rings)  # wraps 3+ times
    assert session.generate(PROMPT3, len(tokens)) == tokens
    session.reset()
    session.prefill(PROMPT3)
    steps = np.stack([session.decode(t) for t in tokens[:-1]])
    assert np.abs(steps - logits[len(PROMPT3):]).max() <= 1e-4


@pytest.mark.parametrize("family", ["e", "moe", "dense", "unified"])
def test_llvm_decode_wraps_rings(family, artifacts, expected):
    check_decode_wraps(load(artifacts[family], prefill_chunk=CHUNK), *expected[family])


@pytest.mark.parametrize("family", ["e", "moe"])
def test_runtime_memory_decode_wraps_rings(family, artifacts, expected):
    """The GPU code path (TVM runtime tensors, caches passed as views) on the CPU."""
    check_decode_wraps(load(artifacts[family], prefill_chunk=CHUNK, runtime_memory=True), *expected[family])


def test_static_decode_wraps_rings(checkpoints, expected, tmp_path):
    """Static decode (CUDA graphs' form: whole caches, fixed input tensors) through both buffer kinds."""
    static = compile_families(checkpoints, ("e",), "llvm", tmp_path, static_decode=True)["e"]
    for memory in (False, True):
        check_decode_wraps(load(static, prefill_chunk=CHUNK, runtime_memory=memory), *expected["e"])


def _vulkan_adapter():
    try:
        import wgpu

        return wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    except Exception:  # noqa: BLE001 - no wgpu-native library, no driver
        return None


def test_vulkan_decode_wraps_rings(checkpoints, expected, tmp_path):
    if _vulkan_adapter() is None:
        if os.environ.get("CI"):
            raise RuntimeError("CI must provide a Vulkan device (apt-get install mesa-vulkan-drivers)")
        pytest.skip("needs a Vulkan device (apt-get install mesa-vulkan-drivers) and wgpu")
    art = compile_families(checkpoints, ("e",), "vulkan", tmp_path)["e"]
    session = load(art, prefill_chunk=CHUNK)
    assert "Vulkan" in session.executor.device_name
    check_decode_wraps(session, *expected["e"])


def test_rpc_decode_wraps_rings(artifacts, expected):
    """Caches kept on a compiler-free RPC server (one session: generate, reset, teacher-forced decode)."""
    from test_rpc import NO_COMPILER, free_port, start_server

    from g4c.runtime.remote import remote_executor

    port = free_port()
    server = start_server([sys.executable, "-c", NO_COMPILER], port, sessions=1)
    try:
        session = ArtifactSession(artifacts["e"], remote_executor(f"127.0.0.1:{port}"), prefill_chunk=CHUNK)
        check_decode_wraps(session, *expected["e"])
        del session
    finally:
        try:
            server.wait(timeout=60)
        finally:
            if server.poll() is None:
                server.kill()


ARM_SCRIPT = """
import json, sys
import g4c
session = g4c.load(sys.argv[1], prefill_chunk=int(sys.argv[2]))
print(json.dumps(session.generate(json.loads(sys.argv[3]), int(sys.argv[4]))))
"""


@pytest.mark.slow
def test_arm_decode_wraps_rings_under_qemu(checkpoints, expected, tmp_path):
    """The aarch64 artifact in the emulated Raspberry Pi 5 Python (scripts/arm-emu.sh): greedy tokens."""
    import json
    import subprocess
    from pathlib import Path

    if not all(shutil.which(t) for t in ("qemu-aarch64", "aarch64-linux-gnu-gcc")):
        pytest.skip("needs qemu-aarch64 and aarch64-linux-gnu-gcc")
    art = compile_families(checkpoints, ("dense",), "arm", tmp_path)["dense"]
    tokens = expected["dense"][0]
    emu = Path(__file__).resolve().parents[1] / "scripts" / "arm-emu.sh"
    result = subprocess.run([str(emu), "python", "-c", ARM_SCRIPT, str(art), str(CHUNK), json.dumps(PROMPT3),
                             str(len(tokens))], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == tokens
