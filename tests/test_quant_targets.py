"""Quantized artifacts (`--quant q4|q8`, Q4_0 GGUF files) on the targets tests/test_quant.py does not
run: ARM under qemu-aarch64 (exact against transformers on the dequantized weights, greedy tokens
identical), CUDA and Metal compiled here without a GPU (fatbin / MSL for every quantized kernel, decode
one CUDA graph), and bad GGUF files and options given to `g4c compile` (one line, exit status 1,
nothing written).

Tolerances are test_quant.py's: logits within 1e-4 of transformers run in fp32 on the weights the
kernels compute with (the dequantized blocks), and an error against the unquantized model no larger
than round-to-nearest's own (+1e-4)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cuda_library import FATBIN_MAGIC, cuda_module
from conftest import PROMPT
from hf_reference import hf_config, load_reference, make_checkpoint, reference_greedy, reference_logits
from test_quant import QUANT_FAMILIES, _assert_expert_banks_quantized, dequantized_reference, quantized_tensors

from g4c.compiler import compile_model
from g4c.model import load_model

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "scripts" / "arm-emu.sh"
ARM_TOOLS = ("qemu-aarch64", "aarch64-linux-gnu-gcc")
needs_arm = pytest.mark.skipif(not all(shutil.which(t) for t in ARM_TOOLS),
                               reason=f"needs {', '.join(ARM_TOOLS)} (apt-get install qemu-user gcc-aarch64-linux-gnu)")
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (pip install nvidia-cuda-nvcc)")
SEEDS = {family: 20 + i for i, family in enumerate(QUANT_FAMILIES)}  # test_quant's checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """family → a tiny checkpoint of test_quant's QUANT_FAMILIES (every matrix whole groups of 32), made
    on first use."""
    root = tmp_path_factory.mktemp("qt-ckpt")
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            kwargs, unified = QUANT_FAMILIES[family]
            made[family] = make_checkpoint(root / family, hf_config(kwargs, unified), seed=SEEDS[family])
        return made[family]
    return get


@pytest.fixture(scope="module")
def compiled(checkpoint, tmp_path_factory):
    """(family, scheme, target) → the artifact, compiled once per module."""
    root = tmp_path_factory.mktemp("qt-art")
    cache: dict[tuple, Path] = {}

    def get(family: str, scheme: str, target: str) -> Path:
        key = family, scheme, target
        if key not in cache:
            loaded = load_model(str(checkpoint(family)))
            cache[key] = compile_model(loaded.cfg, loaded.weights, target,
                                       root / f"{family}-{scheme}-{target.replace(':', '_')}",
                                       quant=scheme, quant_ple=scheme)
        return cache[key]
    return get


def _manifest(artifact: Path) -> dict:
    return json.loads((artifact / "manifest.json").read_text())


def _ops(manifest: dict) -> set[str]:
    return {spec["op"] for spec in manifest["kernels"].values()}


def _assert_quantized(manifest: dict, family: str, scheme: str, expert_ops: list[str]) -> None:
    """What test_quant requires of an artifact compiled with --quant: quantized GEMVs/GEMMs and gather,
    no float linear left, the PLE table in the scheme, the expert banks quantized."""
    ops = _ops(manifest)
    assert {"linear_q", "embed_q"} <= ops and "linear" not in ops and manifest["quant"] == scheme
    assert manifest["host_quant"] == (scheme if family == "e" else None)
    if family == "moe":
        _assert_expert_banks_quantized(manifest, scheme, expert_ops)


# ---- ARM under qemu ------------------------------------------------------------------------------
# One emulated Python per artifact (qemu start-up and the g4c install cost ~10 s each): the prompt's
# logits through chunked prefill, the decode kernels' logits, and a greedy continuation.
EMULATED_RUN = """
import sys
import numpy as np
import g4c

art, out, prompt = sys.argv[1], sys.argv[2], [int(t) for t in sys.argv[3].split(",")]
session = g4c.load(art, prefill_chunk=7)
logits = session.prefill(prompt, all_logits=True)
session.reset()
session.prefill(prompt[:10])
decoded = np.stack([session.decode(t) for t in prompt[10:16]])
session.reset()
greedy = session.generate(prompt[:6], 16)
np.savez(out, logits=logits, decoded=decoded, greedy=np.array(greedy))
"""


def run_emulated(artifact: Path, tmp_path: Path, qemu_cpu: str | None = None) -> dict[str, np.ndarray]:
    script, out = tmp_path / "run_arm.py", tmp_path / "arm-out.npz"
    script.write_text(EMULATED_RUN)
    env = dict(os.environ, **({"QEMU_CPU": qemu_cpu} if qemu_cpu else {}))
    result = subprocess.run([str(EMU), "python", str(script), str(artifact), str(out), ",".join(map(str, PROMPT))],
                            capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


def _assert_aarch64(artifact: Path, profile: str) -> dict:
    library = (artifact / "kernels.so").read_bytes()
    assert library[:4] == b"\x7fELF" and int.from_bytes(library[18:20], "little") == 183  # EM_AARCH64
    manifest = _manifest(artifact)
    assert manifest["target"] == f"arm:{profile}"
    return json.loads(manifest["target_spec"])


def _assert_matches(ran: dict, reference, label: str, exact=None) -> float:
    """The emulated run against transformers (`reference`, on the weights the kernels read); with `exact`
    (transformers on the unquantized checkpoint), the quantization error is round-to-nearest's."""
    expected = reference_logits(reference, PROMPT)
    delta = float(np.abs(ran["logits"] - expected).max())
    decode_delta = float(np.abs(ran["decoded"] - expected[10:16]).max())
    print(f"{label}: max|Δlogits| prefill {delta:.2e}, decode {decode_delta:.2e}")
    assert delta <= 1e-4 and decode_delta <= 1e-4
    assert ran["greedy"].tolist() == reference_greedy(reference, PROMPT[:6], 16)
    if exact is not None:
        truth = reference_logits(exact, PROMPT)
        assert np.abs(ran["logits"] - truth).max() <= np.abs(expected - truth).max() + 1e-4
    return delta


ARM_CASES = [pytest.param("e", "q4", id="e-q4"),  # PLE table, tied embedding, KV sharing; the default run's case
             pytest.param("moe", "q8", id="moe-q8", marks=pytest.mark.slow),
             pytest.param("e", "q8", id="e-q8", marks=pytest.mark.slow),
             pytest.param("moe", "q4", id="moe-q4", marks=pytest.mark.slow)]


@needs_arm
@pytest.mark.parametrize("family, scheme", ARM_CASES)
def test_arm_quantized_artifact_is_exact_under_qemu(family, scheme, compiled, checkpoint, tmp_path):
    artifact = compiled(family, scheme, "arm")
    _assert_aarch64(artifact, "cortex-a76")
    _assert_quantized(_manifest(artifact), family, scheme, ["moe_experts"])
    reference = dequantized_reference(checkpoint(family), artifact, tmp_path)
    _assert_matches(run_emulated(artifact, tmp_path), reference, f"arm {family} {scheme}",
                    exact=load_reference(checkpoint(family)))


# Every ARM profile with its extensions (dotprod everywhere, i8mm + bf16 on the Armv9 cortex-a710) compiles
# quantized kernels; qemu 7.2 has no cortex-a55/a710 model, so the a710 artifact runs on qemu's `max` core
# (every extension), the a55's on cortex-a76 (a superset of its extensions).
@needs_arm
@pytest.mark.slow
@pytest.mark.parametrize("profile, qemu_cpu", [("cortex-a710", "max"), ("cortex-a55", "cortex-a76")])
def test_arm_profiles_with_dotprod_and_i8mm_compile_quantized_kernels(profile, qemu_cpu, compiled, checkpoint,
                                                                      tmp_path):
    artifact = compiled("e", "q4", f"arm:{profile}")
    spec = _assert_aarch64(artifact, profile)
    assert "+dotprod" in spec["mattr"] and ("+i8mm" in spec["mattr"]) == (profile == "cortex-a710")
    _assert_quantized(_manifest(artifact), "e", "q4", [])
    reference = dequantized_reference(checkpoint("e"), artifact, tmp_path)
    _assert_matches(run_emulated(artifact, tmp_path, qemu_cpu), reference, f"arm:{profile} e q4")


# ---- GGUF files ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_file(checkpoint, tmp_path_factory):
    """(family, file type) → (GGUF path, the writer's record: per HF tensor its stored type and values)."""
    pytest.importorskip("gguf")
    from gguf_writer import write_gguf

    root = tmp_path_factory.mktemp("qt-gguf")
    cache: dict[tuple, tuple[Path, dict]] = {}

    def get(family: str, file_type: str) -> tuple[Path, dict]:
        if (family, file_type) not in cache:
            path = root / f"{family}-{file_type}.gguf"
            cache[family, file_type] = path, write_gguf(checkpoint(family), path, file_type)
        return cache[family, file_type]
    return get


def _file_reference(checkpoint_dir: Path, record: dict):
    """transformers with every tensor replaced by the values the GGUF file stores (Q4_0 blocks dequantized
    by gguf)."""
    model = load_reference(checkpoint_dir)
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for hf_name, stored in record.items():
            state[hf_name].copy_(torch.from_numpy(stored["values"]))
    return model


def _compile_gguf(path: Path, target: str, out: Path) -> Path:
    loaded = load_model(str(path))
    return compile_model(loaded.cfg, loaded.weights, target, out)


def _assert_stored_blocks(manifest: dict, record: dict) -> None:
    """No --quant: the file's Q4_0 matrices are compiled as stored (q4 blocks, quantized kernels)."""
    assert manifest["quant"] is None
    q4 = {name.removeprefix("model.") for name, stored in record.items() if stored["type"] == "Q4_0"}
    stored = quantized_tensors(manifest)
    assert "layers.0.self_attn.q_proj.weight" in q4 and "embed_tokens.weight" in q4
    assert set(stored.values()) == {"q4"} and q4 - {"embed_tokens_per_layer.weight"} <= set(stored)
    assert {"linear_q", "embed_q"} <= _ops(manifest) and "linear" not in _ops(manifest)


@needs_arm
@pytest.mark.slow
def test_q4_0_gguf_compiles_for_arm_and_is_exact_under_qemu(gguf_file, checkpoint, tmp_path):
    path, record = gguf_file("e", "Q4_0")
    artifact = _compile_gguf(path, "arm", tmp_path / "gguf-arm")
    _assert_aarch64(artifact, "cortex-a76")
    _assert_stored_blocks(_manifest(artifact), record)
    _assert_matches(run_emulated(artifact, tmp_path), _file_reference(checkpoint("e"), record), "arm gguf Q4_0")


# ---- CUDA and Metal, compiled without a GPU ------------------------------------------------------
def _assert_cuda_artifact(artifact: Path) -> dict:
    """A fatbin holding every kernel (no CUDA source left to compile at load) and a decode step that is
    one CUDA graph replay plus the launch writing the logits."""
    library = (artifact / "kernels.so").read_bytes()
    fmt, block = cuda_module(library)
    assert fmt == b"fatbin" and FATBIN_MAGIC in block
    assert b"__global__" not in library and b'extern "C"' not in block
    manifest = _manifest(artifact)
    assert manifest["target"] == "cuda:sm_90" and manifest["device"] == "cuda" and manifest["static_decode"] is True
    for name in manifest["kernels"]:  # the module's function map names every kernel
        assert f"{name}_kernel".encode() in block, name
    graph = manifest["decode_graph"]
    decode_kernels = sum(1 for step in manifest["programs"]["decode"]["steps"]
                         if step["kernel"] not in ("rows", "reshape", "last"))
    assert graph["outside"] <= 2 and graph["captured"] + graph["outside"] >= decode_kernels
    assert b"vm.builtin.cuda_graph.run_or_capture" in library
    return manifest


GPU_EXPERT_OPS = ["moe_gate_up", "moe_down", "moe_gate_up_grouped", "moe_down_grouped"]
CUDA_CASES = [pytest.param("e", "q4", id="e-q4"), pytest.param("moe", "q8", id="moe-q8", marks=pytest.mark.slow),
              pytest.param("e", "q8", id="e-q8", marks=pytest.mark.slow),
              pytest.param("moe", "q4", id="moe-q4", marks=pytest.mark.slow)]


@needs_nvcc
@pytest.mark.parametrize("family, scheme", CUDA_CASES)
def test_cuda_quantized_artifact_is_a_fatbin_and_one_decode_graph(family, scheme, compiled):
    manifest = _assert_cuda_artifact(compiled(family, scheme, "cuda:sm_90"))
    _assert_quantized(manifest, family, scheme, GPU_EXPERT_OPS)
    assert {"attention_split", "prefill_attention_split", "head_norm_rope", "cache_write"} <= _ops(manifest)
    specs = [spec for spec in manifest["kernels"].values() if spec["op"] in ("linear_q", "embed_q")]
    assert {spec["scheme"] for spec in specs} == {scheme}
    assert any(spec["op"] == "linear_q" and spec["rows"] == 1 for spec in specs)  # decode GEMVs


@needs_nvcc
def test_q4_0_gguf_compiles_for_cuda(gguf_file, tmp_path):
    path, record = gguf_file("e", "Q4_0")
    manifest = _assert_cuda_artifact(_compile_gguf(path, "cuda", tmp_path / "gguf-cuda"))
    _assert_stored_blocks(manifest, record)


METAL_CASES = [pytest.param("moe", "q4", id="moe-q4"), pytest.param("e", "q8", id="e-q8"),
               pytest.param("moe", "q8", id="moe-q8", marks=pytest.mark.slow),
               pytest.param("e", "q4", id="e-q4", marks=pytest.mark.slow)]
MACH_O_64, CPU_TYPE_ARM64 = bytes.fromhex("cffaedfe"), 0x0100000C


@pytest.mark.parametrize("family, scheme", METAL_CASES)
def test_metal_quantized_artifact_has_msl_for_every_kernel(family, scheme, compiled):
    artifact = compiled(family, scheme, "metal")
    manifest = _manifest(artifact)
    assert manifest["target"] == "metal:apple-m1" and manifest["static_decode"] is True
    _assert_quantized(manifest, family, scheme, GPU_EXPERT_OPS)
    msl = (artifact / "kernels.metal").read_text()
    entries = set(re.findall(r"kernel void (\w+)\(", msl))
    assert {f"{kernel}_kernel" for kernel in manifest["kernels"]} <= entries
    specs = manifest["kernels"]
    prefill = {specs[s["kernel"]]["op"] for s in manifest["programs"]["prefill"]["steps"] if s["kernel"] in specs}
    assert "linear_q" in prefill  # (g4c's tiled GEMM, Metal's float prefill GEMM, has no quantized form)
    assert any(spec["op"] == "linear_q" and spec["rows"] == 1 for spec in specs.values())  # decode GEMVs
    with tarfile.open(artifact / "kernels.tar") as tar:
        objects = [tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()]
    assert objects and all(io.BytesIO(o).read(4) == MACH_O_64 and
                           int.from_bytes(o[4:8], "little") == CPU_TYPE_ARM64 for o in objects)


# ---- bad input to `g4c compile` ------------------------------------------------------------------
def _cli_compile(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "g4c.cli", "compile", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def _assert_refused(result: subprocess.CompletedProcess, out: Path, *words: str, progress: bool = False) -> str:
    """Exit status 1, one line on stderr with `words` (after the progress lines of a compile that got that
    far), no traceback; nothing at `out` nor beside it."""
    err = result.stderr
    assert result.returncode == 1, err[-2000:]
    lines = err.splitlines()
    assert err.endswith("\n") and "Traceback" not in err and (progress or len(lines) == 1), err
    assert lines[-1].startswith("g4c: error: ") and sum(line.startswith("g4c: error") for line in lines) == 1, err
    for word in words:
        assert word in lines[-1], (word, err)
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return err


def _retype(path: Path, tensor: str, type_id: int, out: Path) -> Path:
    """A copy of GGUF `path` with `tensor`'s GGML type id replaced (its data left as it is)."""
    data = bytearray(path.read_bytes())
    at = data.index(tensor.encode()) + len(tensor)
    at += 4 + 8 * int.from_bytes(data[at:at + 4], "little")  # n_dims, the dims, then the type
    data[at:at + 4] = type_id.to_bytes(4, "little")
    out.write_bytes(bytes(data))
    return out


def test_compile_refuses_a_gguf_of_another_architecture(tmp_path):
    """A llama GGUF with Q4_0 blocks (what llama-quantize writes): refused before anything is built."""
    gguf = pytest.importorskip("gguf")

    llama = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(llama), "llama")
    writer.add_block_count(1)
    weight = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    writer.add_tensor("token_embd.weight", gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q4_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    out = tmp_path / "out"
    _assert_refused(_cli_compile(str(llama), "--quant", "q4", "-o", str(out)), out, "architecture 'llama'",
                    "Gemma 4")


def test_compile_refuses_an_unsupported_quantization_type_naming_the_tensor(gguf_file, tmp_path):
    """NVFP4 (a newer llama.cpp type, 64 values in 36 bytes: a Q4_0 row of 64 has the same size) is read by
    gguf but has no g4c kernel nor conversion: refused naming the tensor and its type."""
    gguf = pytest.importorskip("gguf")

    path, _ = gguf_file("e", "Q4_0")
    tensor = "blk.1.attn_q.weight"
    bad = _retype(path, tensor, int(gguf.GGMLQuantizationType.NVFP4), tmp_path / "nvfp4.gguf")
    assert {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(bad)).tensors}[tensor] == "NVFP4"
    out = tmp_path / "out"
    _assert_refused(_cli_compile(str(bad), "--quant", "q4", "-o", str(out)), out, tensor, "NVFP4")


def test_compile_refuses_a_truncated_gguf_and_keeps_the_old_artifact(gguf_file, tmp_path):
    path, _ = gguf_file("e", "Q4_0")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size - 1000])
    out = tmp_path / "out"
    _assert_refused(_cli_compile(str(truncated), "--quant", "q8", "-o", str(out)), out, "truncated")
    existing = tmp_path / "existing"  # --overwrite of an artifact: refused before it is touched
    existing.mkdir()
    (existing / "manifest.json").write_text("{}")
    result = _cli_compile(str(truncated), "--overwrite", "-o", str(existing))
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "truncated" in result.stderr
    assert [p.name for p in existing.iterdir()] == ["manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf", "existing"]


@pytest.mark.parametrize("option, value", [("--quant", "Q4_0"), ("--quant-ple", "int4")])
def test_compile_refuses_an_unknown_scheme_for_a_gguf_model(option, value, gguf_file, tmp_path):
    """llama.cpp's spelling (Q4_0) is not a --quant value, nor is int4 a --quant-ple one (test_quant
    checks --quant q3 on a preset)."""
    path, _ = gguf_file("e", "Q4_0")
    out = tmp_path / "out"
    _assert_refused(_cli_compile(str(path), option, value, "-o", str(out)), out, f"unknown quantization '{value}'")


def test_compile_of_a_gguf_with_a_nan_block_leaves_nothing_behind(gguf_file, tmp_path):
    """A Q4_0 block whose fp16 scale is NaN is compiled as stored (no conversion reads it) until the weights
    are written: the error comes after the library is built, mid-write, and the temporary directory goes."""
    gguf = pytest.importorskip("gguf")

    path, _ = gguf_file("e", "Q4_0")
    tensor = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.1.attn_q.weight")
    assert tensor.tensor_type.name == "Q4_0"
    data = bytearray(path.read_bytes())
    data[tensor.data_offset: tensor.data_offset + 2] = np.float16(np.nan).tobytes()  # the first block's d
    bad = tmp_path / "nan.gguf"
    bad.write_bytes(bytes(data))
    out = tmp_path / "out"
    _assert_refused(_cli_compile(str(bad), "--no-check", "-o", str(out)), out,
                    "layers.1.self_attn.q_proj.weight has NaN values", progress=True)
    assert [p.name for p in tmp_path.iterdir()] == ["nan.gguf"]
