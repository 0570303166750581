"""The ARM CPU target: artifacts cross-compiled for aarch64 run inside an emulated aarch64 Python
(scripts/arm-emu.sh: qemu-user with QEMU_CPU=cortex-a76, the Raspberry Pi 5 core) and match
transformers. CI installs the cross gcc and qemu; elsewhere these tests skip when the tools are absent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import PROMPT, compile_families
from hf_reference import reference_greedy, reference_logits

from g4c.cli import main
from g4c.artifact import ArtifactError
from g4c.runtime import load

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "scripts" / "arm-emu.sh"
FAMILIES = ["e", "moe", "dense"]
TOOLS = ("qemu-aarch64", "aarch64-linux-gnu-gcc")

if not all(shutil.which(t) for t in TOOLS):
    if os.environ.get("CI"):
        raise RuntimeError(f"CI must install {', '.join(TOOLS)} (.ci/run does)")
    pytest.skip(f"needs {', '.join(TOOLS)} (apt-get install qemu-user gcc-aarch64-linux-gnu)",
                allow_module_level=True)


class _Compiled(dict):
    """family → its arm artifact, compiled when a test first asks (the default run needs e and dense)."""

    def __init__(self, checkpoints, root: Path):
        super().__init__()
        self.checkpoints, self.root = checkpoints, root

    def __missing__(self, family: str) -> Path:
        self[family] = compile_families(self.checkpoints, (family,), "arm", self.root)[family]
        return self[family]


@pytest.fixture(scope="module")
def arm_artifacts(checkpoints, tmp_path_factory) -> dict[str, Path]:
    return _Compiled(checkpoints, tmp_path_factory.mktemp("arm"))


def emulated(*args: str) -> str:
    result = subprocess.run([str(EMU), *args], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_arm_artifact_is_aarch64_code_for_the_profile(arm_artifacts):
    library = (arm_artifacts["e"] / "kernels.so").read_bytes()
    assert library[:4] == b"\x7fELF" and int.from_bytes(library[18:20], "little") == 183  # EM_AARCH64
    manifest = json.loads((arm_artifacts["e"] / "manifest.json").read_text())
    assert manifest["target"] == "arm:cortex-a76"
    spec = json.loads(manifest["target_spec"])
    assert spec["mtriple"] == "aarch64-linux-gnu" and spec["mcpu"] == "cortex-a76" and "+dotprod" in spec["mattr"]


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f != "e" else f for f in FAMILIES])
def test_emulated_arm_logits_and_greedy_match_transformers(family, arm_artifacts, references, tmp_path):
    out = tmp_path / "logits.npy"
    emulated("g4c", "logits", str(arm_artifacts[family]), "--tokens", ",".join(map(str, PROMPT)), "-o", str(out))
    assert np.abs(np.load(out) - reference_logits(references[family], PROMPT)).max() <= 1e-4
    stdout = emulated("g4c", "generate", str(arm_artifacts[family]), "--tokens", ",".join(map(str, PROMPT[:6])),
                      "--max-new-tokens", "32", "--stop", "none")
    new = [int(t) for t in stdout.strip().splitlines()[-1].split(",")]
    assert new == reference_greedy(references[family], PROMPT[:6], 32)


def test_emulated_python_is_aarch64_without_the_compiler():
    stdout = emulated("python", "-c", "import platform, importlib.util as u; "
                      "print(platform.machine(), u.find_spec('tvm') is None, u.find_spec('tvm_ffi') is not None)")
    assert stdout.split() == ["aarch64", "True", "True"]


def test_foreign_artifacts_and_targets_are_refused_here(arm_artifacts, capsys):
    with pytest.raises(ArtifactError, match=r"compiled for arm:cortex-a76 \(aarch64\)"):
        load(arm_artifacts["dense"])
    assert main(["generate", "tiny-e", "--random-weights", "--backend", "tvm", "--target", "arm:cortex-a78",
                 "--tokens", "2,3"]) == 1
    assert main(["compile", "tiny-e", "--random-weights", "--target", "arm:m1", "-o", "/tmp/never"]) == 1
    err = capsys.readouterr().err
    assert "builds artifacts for another device" in err and "unknown ARM profile 'm1'" in err


def test_arm_artifact_over_rpc_to_a_server_inside_qemu(arm_artifacts, references, tmp_path, capsys):
    """The client uploads the aarch64 kernels to g4c's RPC server running under qemu-aarch64."""
    from test_rpc import free_port, run_remotely, start_server

    port = free_port()
    server = start_server([str(EMU), "python", "-m", "g4c.runtime.rpc_server"], port, sessions=2)
    try:
        logits, new = run_remotely(arm_artifacts["dense"], port, tmp_path, capsys)
    finally:
        server.wait(timeout=120)
    assert np.abs(logits - reference_logits(references["dense"], PROMPT)).max() <= 1e-4
    assert new == reference_greedy(references["dense"], PROMPT[:6], 32)
