"""The Metal target, built on Linux for a Mac: MSL for every fused op, an arm64-macOS host module in
kernels.tar, the link script, and a clear refusal to run here. Running it needs a Mac (not in CI)."""

from __future__ import annotations

import io
import json
import re
import tarfile

import pytest

from g4c.compiler import compile_model
from g4c.model import load_model
from g4c.artifact import ArtifactError
from g4c.runtime import load

MACH_O_64 = bytes.fromhex("cffaedfe")  # MH_MAGIC_64, little-endian
CPU_TYPE_ARM64 = 0x0100000C


@pytest.fixture(scope="module")
def metal_artifact(checkpoints, tmp_path_factory):
    loaded = load_model(str(checkpoints["moe"]))
    return compile_model(loaded.cfg, loaded.weights, "metal", tmp_path_factory.mktemp("metal") / "moe")


def test_metal_artifact_has_msl_for_every_kernel(metal_artifact):
    manifest = json.loads((metal_artifact / "manifest.json").read_text())
    assert manifest["target"] == "metal:apple-m1" and manifest["device"] == "metal"
    assert manifest["library"] == "kernels.dylib" and manifest["static_decode"] is True
    msl = (metal_artifact / "kernels.metal").read_text()
    assert "#include <metal_stdlib>" in msl
    entries = set(re.findall(r"kernel void (\w+)\(", msl))
    for kernel in manifest["kernels"]:
        assert f"{kernel}_kernel" in entries, kernel
    specs = manifest["kernels"]
    ops = {spec["op"] for spec in specs.values()}
    assert {"moe_gate_up", "moe_gate_up_grouped", "moe_align", "prefill_attention_split", "linear_tiled"} <= ops
    assert any(spec["op"] == "linear" and spec["rows"] == 1 for spec in specs.values())  # decode GEMVs
    prefill = {specs[s["kernel"]]["op"] for s in manifest["programs"]["prefill"]["steps"] if s["kernel"] in specs}
    assert "linear_tiled" in prefill and "linear" not in prefill


def test_metal_package_is_arm64_macos_objects_and_a_link_script(metal_artifact):
    with tarfile.open(metal_artifact / "kernels.tar") as tar:
        objects = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert objects and all(name.endswith(".o") for name in objects)
    for data in objects.values():
        header = io.BytesIO(data).read(8)
        assert header[:4] == MACH_O_64 and int.from_bytes(header[4:8], "little") == CPU_TYPE_ARM64
    assert not any(b"vm.builtin.cuda_graph" in data for data in objects.values())  # CUDA-only builtins
    assert any(b"vm.builtin.alloc_storage" in data for data in objects.values())  # (the VM code is in there)
    link = (metal_artifact / "link.sh").read_text()
    assert "clang -dynamiclib" in link and "kernels.dylib" in link
    manifest = json.loads((metal_artifact / "manifest.json").read_text())
    assert {"kernels.tar", "kernels.metal", "link.sh", "weights.safetensors"} <= set(manifest["files"])


def test_metal_artifact_says_to_link_on_the_mac(metal_artifact):
    with pytest.raises(ArtifactError, match=r"compiled for metal:apple-m1 \(macOS, Metal\): run link.sh in it on the Mac"):
        load(metal_artifact)
