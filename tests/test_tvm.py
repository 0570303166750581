"""The TVM backend: compiled artifacts match transformers, run without the compiler, and refuse
corruption."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import PROMPT
from hf_reference import reference_greedy, reference_logits

from g4c.cli import main
from g4c.compiler import compile_model
from g4c.model import load_model
from g4c.artifact import ArtifactError
from g4c.runtime import load

FAMILIES = ["e", "moe", "dense", "unified"]


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_logits_match_transformers(family, artifacts, references):
    session = load(artifacts[family], prefill_chunk=7)  # several chunks, longer than the sliding window
    logits = session.prefill(PROMPT, all_logits=True)
    assert np.abs(logits - reference_logits(references[family], PROMPT)).max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_greedy_32_matches_transformers(family, artifacts, references):
    assert load(artifacts[family]).generate(PROMPT[:6], 32) == reference_greedy(references[family], PROMPT[:6], 32)


@pytest.mark.parametrize("family", ["e", "moe"])
def test_compiled_prefill_then_decode_equals_full_recompute(family, artifacts):
    session = load(artifacts[family], prefill_chunk=4)
    full = session.prefill(PROMPT, all_logits=True)
    session.reset()
    steps = [session.prefill(PROMPT[:7])] + [session.decode(t) for t in PROMPT[7:]]
    np.testing.assert_allclose(np.stack(steps), full[6:], atol=1e-5, rtol=0)


def test_ring_buffers_and_shared_layers_own_no_cache(artifacts):
    session = load(artifacts["e"], max_context=64, prefill_chunk=4)
    manifest = session.manifest
    cfg = manifest.config
    rings = {s: c.shape[0] for s, c in session.caches.items() if manifest.kv_slots[s].ring}
    assert rings and set(rings.values()) == {cfg["sliding_window"] + 4 - 1}
    assert {info.layer for info in manifest.kv_slots.values()} == {0, 1, 2, 3}  # layers 4-6 reuse


RUNTIME_ONLY = """
import sys, json
for name in ("tvm", "tvm.relax", "tvm.tirx", "tvm.te"):
    sys.modules[name] = None  # importing the compiler fails, as on a device
import g4c
session = g4c.load(sys.argv[1])
print(json.dumps(session.generate([2, 17, 99, 5], 12, stop_tokens=())))
assert not any(m == "tvm" or m.startswith("tvm.") for m, v in sys.modules.items() if v is not None)
"""


def test_artifact_runs_in_a_fresh_process_without_the_compiler(artifacts):
    result = subprocess.run([sys.executable, "-c", RUNTIME_ONLY, str(artifacts["e"])], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == load(artifacts["e"]).generate([2, 17, 99, 5], 12, stop_tokens=())


def _copy(artifacts, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(artifacts["dense"], dst)
    return dst


def test_modified_truncated_or_foreign_artifacts_are_refused(artifacts, tmp_path):
    art = _copy(artifacts, tmp_path)
    weights = art / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="weights.safetensors is corrupt or was modified"):
        load(art)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ArtifactError, match="corrupt or was modified"):
        load(art)
    shutil.copy(artifacts["dense"] / "weights.safetensors", weights)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["g4c_version"] = "0.0.1"
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="compiled by g4c 0.0.1"):
        load(art)
    (art / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(ArtifactError, match="format v1 is not the v5 this g4c reads: recompile it"):
        load(art)
    (art / "kernels.so").unlink()
    manifest["g4c_version"] = json.loads((artifacts["dense"] / "manifest.json").read_text())["g4c_version"]
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="kernels.so is missing"):
        load(art)


def test_cli_compile_logits_generate_and_refusal(artifacts, checkpoints, references, tmp_path):
    art = tmp_path / "cli.g4c"
    assert main(["compile", str(checkpoints["moe"]), "--target", "llvm", "-o", str(art)]) == 0
    out = tmp_path / "l.npy"
    assert main(["logits", str(art), "--tokens", ",".join(map(str, PROMPT)), "-o", str(out)]) == 0
    assert np.abs(np.load(out) - reference_logits(references["moe"], PROMPT)).max() <= 1e-4
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["target"] == "llvm" and set(manifest["files"]) == {"kernels.so", "weights.safetensors"}
    assert manifest["config"]["num_experts"] == 6 and manifest["kv_plan"]
    assert set(manifest["programs"]) == {"prefill", "prefill_all", "decode"}  # Relax entry functions
    assert manifest["entry"]["inputs"] == ["ids", "positions"] and manifest["entry"]["caches"]
    (art / "weights.safetensors").write_bytes(b"truncated")
    result = subprocess.run([sys.executable, "-m", "g4c.cli", "generate", str(art), "--tokens", "1,2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "corrupt or was modified" in result.stderr


def test_failed_compile_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    import g4c.compiler as build

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(build, "_write_host_tables", fail)
    loaded = load_model(str(checkpoints["dense"]))
    with pytest.raises(RuntimeError):
        compile_model(loaded.cfg, loaded.weights, "llvm", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_tvm_backend_compiles_in_memory(checkpoints, references, tmp_path):
    out = tmp_path / "x.npy"
    assert main(["logits", str(checkpoints["unified"]), "--tokens", "1,2,3,4,5,6,7", "-o", str(out),
                 "--backend", "tvm", "--target", "llvm"]) == 0
    assert np.abs(np.load(out) - reference_logits(references["unified"], [1, 2, 3, 4, 5, 6, 7])).max() <= 1e-4


def test_bf16_artifact_of_a_bf16_checkpoint_matches_transformers(checkpoints, tmp_path):
    """bf16 weights stored as bf16, computed in fp32: exact up to fp32 rounding."""
    import torch
    from hf_reference import load_reference

    model = load_reference(checkpoints["e"]).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    loaded = load_model(str(tmp_path / "bf16"))
    art = compile_model(loaded.cfg, loaded.weights, "llvm", tmp_path / "art", dtype="bfloat16")
    assert json.loads((art / "manifest.json").read_text())["weight_dtype"] == "bfloat16"
    expected = reference_logits(load_reference(tmp_path / "bf16"), PROMPT)
    assert np.abs(load(art).prefill(PROMPT, all_logits=True) - expected).max() <= 1e-4


@pytest.mark.parametrize("dtype, tolerance", [("float16", 0.05), ("bfloat16", 0.15)])
def test_half_precision_weights_of_fp32_model(dtype, tolerance, artifacts, checkpoints, references, tmp_path):
    """Rounding an fp32 model's weights to fp16/bf16 moves its logits by at most `tolerance` × max |logit|
    (stated bound; MoE routing can flip on near-ties) and halves the weight file."""
    loaded = load_model(str(checkpoints["moe"]))
    art = compile_model(loaded.cfg, loaded.weights, "llvm", tmp_path / "art", dtype=dtype)
    expected = reference_logits(references["moe"], PROMPT)
    diff = np.abs(load(art).prefill(PROMPT, all_logits=True) - expected).max()
    assert diff <= tolerance * np.abs(expected).max()
    fp32_size = (artifacts["moe"] / "weights.safetensors").stat().st_size
    assert (art / "weights.safetensors").stat().st_size < 0.6 * fp32_size


def test_k_eq_v_global_layers_cache_v_only(artifacts):
    """plan_kv_cache's single-tensor K/V: the compiled model keeps no K cache for k_eq_v global layers
    (K is rebuilt from V inside attention), and the parity tests above show it is exact."""
    slots = json.loads((artifacts["moe"] / "manifest.json").read_text())["kv_slots"]
    assert {"layers.2.v", "layers.4.v"} <= set(slots) and not {"layers.2.k", "layers.4.k"} & set(slots)
    assert {"layers.0.k", "layers.0.v"} <= set(slots)  # sliding layers keep both


def test_runtime_memory_path_matches_numpy_buffers(artifacts):
    """The GPU code path (weights, caches, inputs as TVM runtime tensors; caches passed as views; logits
    copied back) run on the CPU gives the same logits and tokens as the numpy-buffer path."""
    from g4c.runtime import load

    plain, device = load(artifacts["e"]), load(artifacts["e"], runtime_memory=True)
    prompt = [2, 17, 99, 5, 8, 1, 44, 23, 60, 7]
    assert np.array_equal(plain.prefill(prompt, all_logits=True), device.prefill(prompt, all_logits=True))
    plain.reset()
    device.reset()
    assert plain.generate(prompt[:4], 12) == device.generate(prompt[:4], 12)


def test_static_decode_matches_and_reuses_its_input_tensors(artifacts, checkpoints, tmp_path):
    """Static decode (CUDA's form, for graph replay: one token, whole caches, the same input tensors
    refilled every step) compiled for the CPU gives the plain artifact's logits and tokens, through
    numpy buffers and through runtime tensors."""
    from conftest import compile_families

    from g4c.runtime import load

    static = compile_families(checkpoints, ("e",), "llvm", tmp_path, static_decode=True)["e"]
    assert json.loads((static / "manifest.json").read_text())["static_decode"] is True
    prompt = [2, 17, 99, 5, 8, 1, 44, 23, 60, 7]
    plain = load(artifacts["e"])
    expected = plain.generate(prompt[:3], 14)
    plain.reset()
    plain.prefill(prompt[:3])
    reference = [plain.decode(t) for t in expected[:6]]
    for memory in (False, True):
        session = load(static, runtime_memory=memory)
        assert session.generate(prompt[:3], 14) == expected  # 17 positions: past the sliding windows
        session.reset()
        session.prefill(prompt[:3])
        fixed = None
        for token, logits in zip(expected[:6], reference):
            np.testing.assert_allclose(session.decode(token), logits, atol=1e-5)
            tensors = [id(t) for _, t in session.executor._fixed]
            assert fixed in (None, tensors)  # the same tensors every step
            fixed = tensors


@pytest.mark.slow  # ~29 s: two compiles; CI time (the seeded quantized test covers the seed path)
def test_weights_from_seed_artifact_matches_the_written_one(tmp_path):
    """--weights-from-seed writes no weight files; the runtime regenerates them (packed q/k/v, RoPE
    tables, the PLE table) bit-identically."""
    from g4c.cli import main
    from g4c.runtime import load

    assert main(["compile", "tiny-e", "--random-weights", "--seed", "3", "-o", str(tmp_path / "full")]) == 0
    assert main(["compile", "tiny-e", "--random-weights", "--seed", "3", "--weights-from-seed",
                 "-o", str(tmp_path / "seed")]) == 0
    assert not (tmp_path / "seed" / "weights.safetensors").exists()
    assert not (tmp_path / "seed" / "host.safetensors").exists()
    prompt = [2, 17, 99, 5, 8, 1, 44]
    full, seeded = load(tmp_path / "full"), load(tmp_path / "seed")
    assert np.array_equal(full.prefill(prompt, all_logits=True), seeded.prefill(prompt, all_logits=True))
    assert main(["init-random", "tiny-e", "-o", str(tmp_path / "ckpt")]) == 0  # a checkpoint: no seed to use
    assert main(["compile", str(tmp_path / "ckpt"), "--weights-from-seed", "-o", str(tmp_path / "x")]) == 1
    assert not (tmp_path / "x").exists()


def test_runtime_memory_session_reports_decode_bytes(artifacts):
    """The roofline's byte count works when the weights live in device memory (GPU sessions)."""
    from g4c.bench import decode_weight_bytes
    from g4c.runtime import load

    plain = load(artifacts["moe"])
    assert decode_weight_bytes(load(artifacts["moe"], runtime_memory=True)) == decode_weight_bytes(plain)


DEVICE_CLI = """
import sys
for name in ("tvm", "g4c.ir", "g4c.passes", "g4c.codegen", "g4c.targets", "g4c.frontend", "g4c.compiler"):
    sys.modules[name] = None  # a device has the runtime only
from g4c.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_cli_runs_an_artifact_where_only_the_runtime_is_installed(artifacts):
    result = subprocess.run([sys.executable, "-c", DEVICE_CLI, "generate", str(artifacts["e"]), "--tokens", "2,17,99",
                             "--max-new-tokens", "6", "--stop", "none"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert [int(t) for t in result.stdout.strip().splitlines()[-1].split(",")] == \
        load(artifacts["e"]).generate([2, 17, 99], 6)


def test_bundled_runtime_artifact_loads_where_tvm_is_imported(checkpoints, tmp_path):
    """An artifact that carries libtvm_runtime.so, loaded in a process that already imported TVM, uses
    the runtime already there (a second copy aborts the process on duplicate registrations)."""
    art = tmp_path / "bundled"
    assert main(["compile", str(checkpoints["dense"]), "--bundle-runtime", "--no-check", "-o", str(art)]) == 0
    assert (art / "libtvm_runtime.so").is_file()
    code = f"import tvm, g4c; print(g4c.load({str(art)!r}).generate([2, 17, 99], 4))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(load(art).generate([2, 17, 99], 4))
