"""The CUDA target without a GPU: lowering with the shared GPU kernels, nvcc's ahead-of-time fatbin in
the exported library (no CUDA source left to compile at load time), the runtime bundle, and the
manifest a GPU machine needs. Running it is scripts/gpu_check.sh's job on a GPU machine."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
from cuda_library import FATBIN_MAGIC, cuda_module
from conftest import compile_families

from g4c.cli import main
from g4c.targets.cuda import fatbin_blob

if shutil.which("nvcc") is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must provide nvcc (.ci/run installs the nvidia-cuda-nvcc wheel)")
    pytest.skip("needs nvcc (the CUDA toolkit, or pip install nvidia-cuda-nvcc)", allow_module_level=True)


@pytest.fixture(scope="module")
def cuda_artifacts(checkpoints, tmp_path_factory):
    return compile_families(checkpoints, ("e", "moe"), "cuda:sm_90", tmp_path_factory.mktemp("cuda"),
                            bundle_runtime=True)


@pytest.mark.parametrize("family", ["e", "moe"])
def test_cuda_library_holds_a_fatbin_and_no_source(family, cuda_artifacts):
    library = (cuda_artifacts[family] / "kernels.so").read_bytes()
    fmt, block = cuda_module(library)
    assert fmt == b"fatbin" and FATBIN_MAGIC in block
    assert b"__global__" not in library and b"extern \"C\"" not in block  # nothing left for NVRTC
    manifest = json.loads((cuda_artifacts[family] / "manifest.json").read_text())
    assert manifest["target"] == "cuda:sm_90" and manifest["device"] == "cuda"
    assert manifest["index_dtype"] == "int32"
    assert json.loads(manifest["target_spec"])["arch"] == "sm_90"
    ops = {spec["op"] for spec in manifest["kernels"].values()}
    assert {"attention_split", "prefill_attention_split", "head_norm_rope", "cache_write", "linear"} <= ops
    if family == "moe":
        assert {"moe_gate_up", "router_topk"} <= ops


@pytest.mark.parametrize("family", ["e", "moe"])
def test_cuda_decode_step_is_one_cuda_graph(family, cuda_artifacts):
    """Decode is compiled static (one token, fixed tensors) and TVM's RewriteCUDAGraph puts its kernel
    launches into one captured graph: a decode step is one graph replay plus the launch that writes
    the returned logits; the library calls the runtime's CUDA-graph builtins."""
    directory = cuda_artifacts[family]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["static_decode"] is True
    graph = manifest["decode_graph"]
    decode_kernels = sum(1 for step in manifest["programs"]["decode"]["steps"]
                         if step["kernel"] not in ("rows", "reshape", "last"))
    assert graph["outside"] <= 2 and graph["captured"] + graph["outside"] >= decode_kernels
    library = (directory / "kernels.so").read_bytes()
    assert b"vm.builtin.cuda_graph.run_or_capture" in library and b"vm.builtin.cuda_graph.get_cached_alloc" in library


def test_cuda_bundle_has_the_runtime_libraries(cuda_artifacts):
    directory = cuda_artifacts["e"]
    names = {p.name for p in directory.iterdir()}
    assert {"libtvm_runtime.so", "libtvm_runtime_cuda.so", "libcudart.so.13", "kernels.so"} <= names
    manifest = json.loads((directory / "manifest.json").read_text())
    assert {"libtvm_runtime.so", "libtvm_runtime_cuda.so", "libcudart.so.13"} <= set(manifest["files"])
    size = sum(p.stat().st_size for p in directory.iterdir())
    assert size < 16 << 20  # an artifact plus its runtime is small enough to carry to a device


def test_fatbin_blob_rewrites_only_cuda_modules():
    source = "extern \"C\" __global__ void k() {}"
    module = struct.pack("<Q", 4) + b"cuda" + b"FMAP" + struct.pack("<Q", len(source)) + source.encode()
    other = b"\x01\x02\x03"
    payload = (struct.pack("<Q", 4) + b"_lib" + struct.pack("<Q", len(other)) + other +
               struct.pack("<Q", 4) + b"cuda" + struct.pack("<Q", len(module)) + module)
    blob = struct.pack("<Q", len(payload)) + payload
    out = fatbin_blob(blob, [source], lambda code: b"FATBIN" + code[:3].encode())
    assert out[8:8 + 12 + 8 + 3] == payload[:23]  # the other module untouched
    assert out.endswith(struct.pack("<Q", 6) + b"fatbin" + b"FMAP" + struct.pack("<Q", 9) + b"FATBINext")
    assert struct.unpack_from("<Q", out)[0] == len(out) - 8


def test_cuda_cli_arch_and_refusals(capsys, tmp_path):
    assert main(["compile", "tiny-dense", "--random-weights", "--target", "cuda", "--arch", "sm_80",
                 "--weights-from-seed", "-o", str(tmp_path / "a")]) == 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["target"] == "cuda:sm_80" and manifest["weights_from_seed"]["seed"] == 0
    assert not (tmp_path / "a" / "weights.safetensors").exists()
    assert main(["compile", "tiny-dense", "--random-weights", "--target", "cuda:sm_70", "-o", str(tmp_path / "b")]) == 1
    assert main(["generate", str(tmp_path / "a"), "--tokens", "2,3"]) == 1  # no GPU here: one line
    err = capsys.readouterr().err
    assert "unknown CUDA arch 'sm_70'" in err
    assert not (tmp_path / "b").exists()


def test_cuda_target_states_its_shared_memory(caplog):
    """dlight's GEMV rule warns per kernel when a CUDA target lacks max_shared_memory_per_block; g4c
    sets it, so scheduling a model's kernels logs no such warning."""
    from g4c.codegen.lower import lower
    from g4c.compiler import optimized_graphs
    from g4c.model import load_model
    from g4c.targets.registry import get_target

    target = get_target("cuda")
    assert int(target.tvm_target().attrs["max_shared_memory_per_block"]) == 48 << 10
    model = load_model("tiny-e", random_weights=True)
    lowered = lower(model.cfg, optimized_graphs(model.cfg, model.weights), target.lowering)
    with caplog.at_level("WARNING"):
        for spec in lowered.kernels.values():
            target.kernel(spec)
    assert not [r for r in caplog.records if "max_shared_memory_per_block" in r.getMessage()]
