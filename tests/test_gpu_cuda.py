"""CUDA artifacts on an NVIDIA GPU (marked `gpu`: deselected by default, run with `-m gpu` on a machine
with one). The test checkpoints are compiled here for the device's arch (nvcc's fatbin, the TVM runtime
bundled) and run through g4c's runtime on the GPU, in a process that cannot import the compiler (as on a
device; a bundled runtime must not be loaded beside the compiler's own copy of it): transformers' fp32
logits (≤ 1e-4), 32 greedy tokens, and decode past the sliding window with rings that wrap (static
decode, CUDA graphs). Without a CUDA device (or nvcc) every test skips and says why."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import PROMPT, compile_families
from hf_reference import reference_greedy, reference_logits

pytestmark = pytest.mark.gpu

FAMILIES = ("e", "moe", "dense")


def cuda_capability() -> tuple[int, int] | None:
    """(major, minor) of CUDA device 0 through the driver API, or None without a driver or device."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return None
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
    if cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, 0) or cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, 0):
        return None
    return major.value, minor.value


def arch_for(capability: tuple[int, int]) -> str | None:
    """The g4c arch whose SASS runs on this device: same major version, minor ≤ the device's."""
    from g4c.targets.cuda import ARCHS

    fits = [a for a in ARCHS if int(a[3:-1]) == capability[0] and int(a[-1]) <= capability[1]]
    return max(fits, key=lambda a: int(a[-1])) if fits else None


def _nvcc_on_path() -> bool:
    if shutil.which("nvcc"):
        return True
    try:
        import nvidia
    except ImportError:
        return False
    for root in nvidia.__path__:
        binary = os.path.join(root, "cu13", "bin")
        if os.path.isfile(os.path.join(binary, "nvcc")):
            os.environ["PATH"] = binary + os.pathsep + os.environ.get("PATH", "")
            return True
    return False


@pytest.fixture(scope="module")
def cuda_artifacts(checkpoints, tmp_path_factory):
    capability = cuda_capability()
    if capability is None:
        pytest.skip("needs an NVIDIA GPU with its driver (libcuda.so.1 with at least one device)")
    arch = arch_for(capability)
    if arch is None:
        pytest.skip(f"no g4c CUDA arch runs on sm_{capability[0]}{capability[1]} (SASS for sm_80..sm_90 only)")
    if not _nvcc_on_path():
        pytest.skip("needs nvcc (the CUDA toolkit, or pip install nvidia-cuda-nvcc)")
    return compile_families(checkpoints, FAMILIES, f"cuda:{arch}", tmp_path_factory.mktemp("cuda-run"),
                            bundle_runtime=True)


ON_DEVICE = """
import json, sys
import numpy as np
for name in ("tvm", "tvm.relax", "tvm.tirx", "tvm.te"):
    sys.modules[name] = None  # the runtime only, as on a device: the artifact's bundled TVM runtime is used
import g4c
art, out, prompt, chunk, forced = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
session = g4c.load(art, prefill_chunk=7)
assert session.manifest.device == "cuda" and session.executor.memory is not None  # tensors in GPU memory
np.save(out + "/prompt.npy", session.prefill(prompt, all_logits=True))
session.reset()
greedy = session.generate(prompt[:6], 32)
ring = g4c.load(art, prefill_chunk=chunk)  # rings of window + chunk - 1 slots
wrapped = ring.generate(prompt[:3], len(forced))
ring.reset()
ring.prefill(prompt[:3])
np.save(out + "/decode.npy", np.stack([ring.decode(t) for t in forced[:-1]]))
shapes = [s[0] for n, s in ring.cache_shapes.items() if ring.manifest.kv_slots[n].ring]
json.dump({"greedy": greedy, "wrapped": wrapped, "rings": shapes, "static": ring.manifest.static_decode},
          open(out + "/tokens.json", "w"))
"""


@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_artifact_matches_transformers_on_the_gpu(family, cuda_artifacts, references, tmp_path):
    """In a process without the compiler (the bundled runtime): PROMPT's logits in chunks of 7, 32 greedy
    tokens, and 23 decode steps (a CUDA graph replay each) with rings of window + 1 slots, teacher
    forced on transformers' greedy tokens."""
    from test_decode_wrap import CHUNK, NEW, PROMPT3

    forced = reference_greedy(references[family], PROMPT3, NEW)
    result = subprocess.run([sys.executable, "-c", ON_DEVICE, str(cuda_artifacts[family]), str(tmp_path),
                             json.dumps(PROMPT), str(CHUNK), json.dumps(forced)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    logits = np.load(tmp_path / "prompt.npy")
    assert np.abs(logits - reference_logits(references[family], PROMPT)).max() <= 1e-4
    out = json.loads((tmp_path / "tokens.json").read_text())
    assert out["greedy"] == reference_greedy(references[family], PROMPT[:6], 32)
    assert out["static"] and out["rings"] and max(out["rings"]) + CHUNK < NEW - 1  # decode wraps the rings
    assert out["wrapped"] == forced
    decode = np.load(tmp_path / "decode.npy")
    assert np.abs(decode - reference_logits(references[family], PROMPT3 + forced[:-1])[len(PROMPT3):]).max() <= 1e-4


def test_arch_choice():
    assert arch_for((9, 0)) == "sm_90" and arch_for((8, 9)) == "sm_89" and arch_for((8, 7)) == "sm_86"
    assert arch_for((8, 0)) == "sm_80" and arch_for((10, 0)) is None and arch_for((7, 5)) is None
