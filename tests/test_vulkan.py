"""The Vulkan target: WGSL kernels run through wgpu on a Vulkan device (CI: Mesa lavapipe, with
WGPU_BACKEND_TYPE=Vulkan) and match transformers. Elsewhere these tests skip when no Vulkan adapter
is present; CI must have one (.ci/run installs mesa-vulkan-drivers)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from conftest import PROMPT, compile_families
from hf_reference import reference_greedy, reference_logits

from g4c.cli import main
from g4c.compiler import compile_model
from g4c.model import load_model
from g4c.runtime import load

FAMILIES = ["e", "moe", "dense"]
os.environ.setdefault("WGPU_BACKEND_TYPE", "Vulkan")


def _adapter():
    try:
        import wgpu

        return wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    except Exception:  # noqa: BLE001 - no wgpu-native library, no driver
        return None


if _adapter() is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must provide a Vulkan device (apt-get install mesa-vulkan-drivers)")
    pytest.skip("needs a Vulkan device (apt-get install mesa-vulkan-drivers) and wgpu", allow_module_level=True)


@pytest.fixture(scope="module")
def vulkan_artifacts(checkpoints, tmp_path_factory):
    return compile_families(checkpoints, FAMILIES, "vulkan", tmp_path_factory.mktemp("vulkan"))


@pytest.mark.parametrize("family", FAMILIES)
def test_vulkan_logits_and_greedy_match_transformers(family, vulkan_artifacts, references):
    session = load(vulkan_artifacts[family])
    assert "Vulkan" in session.executor.device_name
    logits = session.prefill(PROMPT, all_logits=True)
    assert np.abs(logits - reference_logits(references[family], PROMPT)).max() <= 1e-4
    session.reset()
    assert session.generate(PROMPT[:6], 32) == reference_greedy(references[family], PROMPT[:6], 32)


def test_vulkan_chunked_prefill_through_ring_buffers(vulkan_artifacts, references):
    """Chunks of 3 tokens against sliding windows of 4-6: the ring buffers wrap inside a prefill."""
    session = load(vulkan_artifacts["e"], prefill_chunk=3)
    logits = session.prefill(PROMPT, all_logits=True)
    assert np.abs(logits - reference_logits(references["e"], PROMPT)).max() <= 1e-4


def test_vulkan_artifact_holds_wgsl_and_launches(vulkan_artifacts):
    directory = vulkan_artifacts["moe"]
    manifest = json.loads((directory / "manifest.json").read_text())
    source = (directory / "kernels.wgsl").read_text()
    assert manifest["runtime"] == "wgpu" and manifest["target"] == "vulkan:generic"
    assert not (directory / "kernels.so").exists()
    assert set(manifest["launches"]) == set(manifest["kernels"])
    entries = {x["kernel"] for group in manifest["launches"].values() for x in group}
    assert entries == set(re.findall(r"^fn (\w+)\(", source, re.MULTILINE))
    assert "i64" not in source and "@workgroup_size" in source
    ops = {spec["op"] for spec in manifest["kernels"].values()}
    assert {"moe_gate_up", "moe_down", "router_topk", "attention_split", "head_norm_rope", "cache_write",
            "linear"} <= ops


def test_grids_wider_than_the_dispatch_limit_fold_into_z():
    """A kernel of 70000 workgroups (> 65535 per dimension) runs completely: the grid folds into z
    and the kernel skips the padding blocks past packGridDimX."""
    import wgpu

    from g4c.codegen import wgsl
    from g4c.codegen.spec import KernelSpec
    from g4c.artifact import split_source
    from g4c.runtime.wgpu_executor import Kernels, workgroups
    from g4c.targets.registry import get_target

    assert workgroups(70000, 1) == ((65535, 1, 2), 69999)
    assert workgroups(100, 3) == ((100, 3, 1), 99)
    target = get_target("vulkan")
    source, launches = wgsl.build({"add_256": target.kernel(KernelSpec.of("add", dim=256))}, target.tvm_target())
    (launch,) = launches["add_256"]
    rows = 70000 * 256 // launch.threads[0]
    a = np.random.default_rng(0).standard_normal((rows, 256), dtype=np.float32)
    b = np.ones_like(a)
    assert wgsl_width(launch, rows) > 65535
    adapter = wgpu.gpu.request_adapter_sync()
    device = adapter.request_device_sync(required_limits={"max-storage-buffer-binding-size": 128 << 20})
    usage = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC | wgpu.BufferUsage.COPY_DST
    bufs = [device.create_buffer_with_data(data=x, usage=usage) for x in (a, b)]
    out = device.create_buffer(size=a.nbytes, usage=usage)
    runner = Kernels(device, split_source(source), {"add_256": [launch.to_json()]})
    encoder = device.create_command_encoder()
    compute = encoder.begin_compute_pass()
    runner.dispatch(compute, "add_256", [(bufs[0], a.shape, 4), (bufs[1], a.shape, 4), (out, a.shape, 4)])
    compute.end()
    device.queue.submit([encoder.finish()])
    result = np.frombuffer(device.queue.read_buffer(out), dtype=np.float32).reshape(a.shape)
    assert np.array_equal(result, a + 1)


def wgsl_width(launch, rows: int) -> int:
    from g4c.runtime.wgpu_executor import evaluate

    return evaluate(launch.grid[0], [rows])


def test_vulkan_refuses_bf16_and_fp16_without_shader_f16(capsys):
    assert main(["compile", "tiny-e", "--random-weights", "--dtype", "bf16", "--target", "vulkan",
                 "-o", "/tmp/never"]) == 1
    assert main(["compile", "tiny-e", "--random-weights", "--dtype", "fp16", "--target", "vulkan",
                 "-o", "/tmp/never"]) == 1
    assert main(["compile", "tiny-e", "--random-weights", "--target", "vulkan:mali-g1", "-o", "/tmp/never"]) == 1
    err = capsys.readouterr().err
    assert "WGSL has no bf16" in err and "has no fp16" in err and "unknown Vulkan profile 'mali-g1'" in err
    assert not os.path.exists("/tmp/never")


def test_tables_bigger_than_a_binding_are_split(checkpoints, references, tmp_path, monkeypatch):
    """With a 50 KiB binding limit the 57.6 KB embedding table (tied LM head) is cut into row slices:
    one gather kernel per slice, the LM head computed slice by slice and its columns reassembled."""
    from g4c.targets import vulkan

    monkeypatch.setitem(vulkan.PROFILES, "generic", vulkan.VulkanProfile(threads=256, fp16=False,
                                                                         max_binding=50 << 10))
    loaded = load_model(str(checkpoints["e"]))
    directory = compile_model(loaded.cfg, loaded.weights, "vulkan", tmp_path / "split")
    manifest = json.loads((directory / "manifest.json").read_text())
    assert [w for w in manifest["entry"]["weights"] if w.startswith("embed_tokens")] == [
        "embed_tokens.weight.rows0-256", "embed_tokens.weight.rows256-300"]
    logits = load(directory).prefill(PROMPT, all_logits=True)
    assert np.abs(logits - reference_logits(references["e"], PROMPT)).max() <= 1e-4


def test_spirv_of_every_kernel_is_valid_for_vulkan(vulkan_artifacts, tmp_path, capsys):
    """`g4c spirv`: naga translates each WGSL kernel, spirv-val accepts every module (Vulkan 1.1)."""
    import shutil

    tools = ("node", "npm", "spirv-val")
    if not all(shutil.which(t) for t in tools):
        if os.environ.get("CI"):
            raise RuntimeError("CI must install nodejs, npm and spirv-tools (.ci/run does)")
        pytest.skip("needs node, npm and spirv-val")
    output = tmp_path / "spirv"
    assert main(["spirv", str(vulkan_artifacts["moe"]), "-o", str(output)]) == 0
    manifest = json.loads((vulkan_artifacts["moe"] / "manifest.json").read_text())
    entries = {x["kernel"] for group in manifest["launches"].values() for x in group}
    assert {p.stem for p in output.glob("*.spv")} == entries
    assert all(p.read_bytes()[:4] == bytes.fromhex("03022307") for p in output.glob("*.spv"))  # SPIR-V magic
    assert json.loads((output / "launches.json").read_text()) == manifest["launches"]
    assert main(["spirv", str(vulkan_artifacts["moe"]), "-o", str(output)]) == 1  # exists: refused
    assert "exists" in capsys.readouterr().err


def test_bench_refuses_gpu_artifacts_in_one_line(vulkan_artifacts, capsys):
    assert main(["bench", str(vulkan_artifacts["e"]), "--prompt-len", "4", "--gen", "2"]) == 1
    assert "g4c bench measures CPU artifacts; this one is for vulkan:generic" in capsys.readouterr().err


def test_fp16_weights_on_a_shader_f16_profile(checkpoints, references, tmp_path):
    """vulkan:adreno-7xx stores matrices in fp16 (`enable f16;` WGSL, shader-f16 on the device); logits
    stay within 5% of the largest |logit| of transformers' fp32 ones (the tolerance the targets state
    for fp16 storage)."""
    loaded = load_model(str(checkpoints["e"]))
    directory = compile_model(loaded.cfg, loaded.weights, "vulkan:adreno-7xx", tmp_path / "f16", dtype="float16")
    assert "enable f16;" in (directory / "kernels.wgsl").read_text()
    reference = reference_logits(references["e"], PROMPT)
    logits = load(directory).prefill(PROMPT, all_logits=True)
    assert np.abs(logits - reference).max() <= 0.05 * np.abs(reference).max()


def _run_kernels(funcs: dict, calls: list[tuple[str, list[np.ndarray]]], outputs: dict[int, tuple]) -> list[np.ndarray]:
    """Run GPU kernels in order on the Vulkan device. `calls`: (kernel, arrays); an argument that is
    an int names an output buffer (`outputs[int]` = its shape), written by one kernel, read by later ones."""
    import wgpu

    from g4c.codegen import wgsl
    from g4c.artifact import split_source
    from g4c.runtime.wgpu_executor import Kernels
    from g4c.targets.gpu import gpu_schedule
    from g4c.targets.registry import get_target

    target = get_target("vulkan").tvm_target()
    source, launches = wgsl.build({n: gpu_schedule(target, n, f) for n, f in funcs.items()}, target)
    device = _adapter().request_device_sync()
    usage = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC | wgpu.BufferUsage.COPY_DST
    made = {k: (device.create_buffer(size=4 * int(np.prod(s)), usage=usage), s, 4) for k, s in outputs.items()}
    runner = Kernels(device, split_source(source), {k: [x.to_json() for x in v] for k, v in launches.items()})
    encoder = device.create_command_encoder()
    compute = encoder.begin_compute_pass()
    for name, args in calls:
        bound = [made[a] if isinstance(a, int) else
                 (device.create_buffer_with_data(data=np.ascontiguousarray(a), usage=usage), a.shape, 4) for a in args]
        runner.dispatch(compute, name, bound)
    compute.end()
    device.queue.submit([encoder.finish()])
    return [np.frombuffer(device.queue.read_buffer(made[k][0]), dtype=np.float32).reshape(s)
            for k, s in outputs.items()]


def _attention_reference(q, keys, values, key_pos, q_pos, window):
    out = np.zeros_like(q)
    group = q.shape[1] // keys.shape[1]
    for i, p in enumerate(q_pos):
        seen = (key_pos <= p) & ((p - key_pos < window) if window else True)
        for h in range(q.shape[1]):
            scores = keys[seen, h // group] @ q[i, h]
            weights = np.exp(scores - scores.max())
            out[i, h] = weights @ values[seen, h // group] / weights.sum()
    return out


@pytest.mark.parametrize("window", [None, 24])
def test_gpu_attention_kernels_over_many_key_chunks(window):
    """The tiled prefill kernel (head_dim 256: 4 keys per 16 KiB chunk, so the online softmax rescales
    across many chunks) and the decode kernel, both followed by the split-K merge, against numpy.
    Slots never written hold NaN: a kernel that read past the positions written would return NaN.
    Sliding: a ring of window + 12 slots holding the last positions; global: a whole 256-slot cache
    (each of the 4 or 16 key ranges spans several chunks)."""
    from g4c.codegen import gpu_kernels as G

    heads, kv_heads, dim, t, start = 4, 2, 256, 13, 200
    rng = np.random.default_rng(0)
    slots = window + t - 1 if window else 256
    last = start + t - 1
    cache_k = np.full((slots, kv_heads, dim), np.nan, np.float32)
    cache_v = cache_k.copy()
    positions = np.arange(max(0, last - slots + 1) if window else 0, last + 1)
    keys = rng.standard_normal((positions.size, kv_heads, dim), dtype=np.float32) * 0.1
    values = rng.standard_normal((positions.size, kv_heads, dim), dtype=np.float32)
    cache_k[positions % slots], cache_v[positions % slots] = keys, values
    q = rng.standard_normal((t, heads, dim), dtype=np.float32)
    q_pos = np.arange(start, last + 1, dtype=np.int32)
    parts = G.attention_parts(window)
    assert G.prefill_chunk_keys(dim, 16384) == 4
    funcs = {"prefill": G.prefill_attention(heads, kv_heads, dim, window, "prefill"),
             "decode": G.attention(heads, kv_heads, dim, window, "decode"),
             "merge": G.attention_merge(heads, dim, parts, "merge")}
    calls = [("prefill", [q, cache_k, cache_v, q_pos, 0]), ("merge", [0, 1]),
             ("decode", [q[-1:], cache_k, cache_v, q_pos[-1:], 2]), ("merge", [2, 3])]
    shapes = {0: (t, heads, parts, dim + 2), 1: (t, heads, dim), 2: (1, heads, parts, dim + 2), 3: (1, heads, dim)}
    _, prefill, _, decode = _run_kernels(funcs, calls, shapes)
    expected = _attention_reference(q, keys, values, positions, q_pos, window)
    np.testing.assert_allclose(prefill, expected, atol=2e-5)
    np.testing.assert_allclose(decode[0], expected[-1], atol=2e-5)


def test_grouped_moe_kernels_match_numpy():
    """Prefill MoE on GPUs: entries sorted into per-expert tiles (experts with 0, 1 and several tiles
    of 16, padded), the grouped gate/up and down GEMMs (hidden and inter not multiples of the 32-wide
    chunks and row tiles) and the top-k sum, against numpy."""
    from g4c.codegen import gpu_kernels as G

    t, hidden, inter, experts, top_k = 50, 48, 40, 6, 2
    rng = np.random.default_rng(1)
    x = rng.standard_normal((t, hidden), dtype=np.float32)
    idx = np.stack([rng.choice([0, 1, 1, 1, 2, 4], size=2, replace=False) for _ in range(t)]).astype(np.int32)
    idx[:3] = [[5, 0], [5, 2], [4, 0]]  # expert 3 gets nothing, expert 5 two entries
    w = rng.random((t, top_k), dtype=np.float32)
    gate_up = rng.standard_normal((experts, 2 * inter, hidden), dtype=np.float32) * 0.2
    down = rng.standard_normal((experts, hidden, inter), dtype=np.float32) * 0.2
    funcs = {"align": G.moe_align(experts, top_k, "align"),
             "gate_up": G.moe_gate_up_grouped(hidden, inter, experts, top_k, "gate_up"),
             "down": G.moe_down_grouped(hidden, inter, experts, top_k, "down"),
             "combine": G.moe_combine(hidden, top_k, "combine")}
    calls = [("align", [idx, 0, 1]), ("gate_up", [x, w, gate_up, 0, 1, 2]), ("down", [2, down, 0, 1, 3]),
             ("combine", [3, 4])]
    shapes = {0: (t, top_k), 1: (t, top_k, G.GEMM_TILE), 2: (t, top_k, inter), 3: (t, top_k, hidden), 4: (t, hidden)}
    tile_expert, _, act, _, out = _run_kernels(funcs, calls, shapes)
    tiles = tile_expert.view(np.int32).reshape(-1)
    counts = np.bincount(idx.reshape(-1), minlength=experts)
    assert list(tiles[tiles >= 0]) == [e for e in range(experts) for _ in range(-(-counts[e] // G.GEMM_TILE))]
    assert (tiles[len(tiles[tiles >= 0]):] == -1).all()

    def gelu(v):
        return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))

    expected_act = np.zeros((t, top_k, inter), np.float32)
    expected = np.zeros((t, hidden), np.float32)
    for i in range(t):
        for j in range(top_k):
            e = idx[i, j]
            g, u = gate_up[e, :inter] @ x[i], gate_up[e, inter:] @ x[i]
            expected_act[i, j] = gelu(g) * u * w[i, j]
            expected[i] += down[e] @ expected_act[i, j]
    np.testing.assert_allclose(act, expected_act, atol=1e-4)
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_tiled_gemm_matches_numpy():
    """The shared-memory tiled GEMM (Metal's prefill linears) with token, row and depth counts that
    are not multiples of its 16 × 32 tiles and 32-column chunks."""
    from g4c.codegen import gpu_kernels as G

    t, k, n = 37, 100, 70
    rng = np.random.default_rng(2)
    x = rng.standard_normal((t, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    (y,) = _run_kernels({"gemm": G.linear_tiled(k, n, "gemm")}, [("gemm", [x, w, 0])], {0: (t, n)})
    np.testing.assert_allclose(y, x @ w.T, atol=1e-4)


NO_WGPU = "import sys; sys.modules['wgpu'] = None; from g4c.cli import main; sys.exit(main(sys.argv[1:]))"


def test_vulkan_artifact_without_wgpu_says_what_to_install(vulkan_artifacts):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", NO_WGPU, "generate", str(vulkan_artifacts["e"]), "--tokens", "1,2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "pip install 'g4c[vulkan]'" in result.stderr
