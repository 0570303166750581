"""The embeddable C runtime (`g4c.embed`): every artifact's lib/libg4c.so, linked by a C app with the
artifact's pkg-config line, must generate what the Python runtime generates (token for token, the same
logits) and what transformers generates, on x86 (llvm), on aarch64 under qemu (arm) and on Vulkan
(lavapipe); run clean under AddressSanitizer + UBSan; give two threads the tokens of one; and turn
every bad input into an error code and a message."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import PROMPT, compile_families
from hf_reference import reference_greedy, reference_logits

from g4c.runtime import load

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "generate.c"
CHECKS = ROOT / "tests" / "c" / "embed_checks.c"
C_FLAGS = ["-O2", "-std=c99", "-D_POSIX_C_SOURCE=200809L", "-Wall", "-Werror"]
CHUNK = 8  # prefill chunk of these tests: PROMPT (20 tokens) runs as 3 chunks, across every sliding window
FAMILIES = ["e", "moe", "dense"]

for tool in ("gcc", "g++", "pkg-config"):
    if shutil.which(tool) is None:
        if os.environ.get("CI"):
            raise RuntimeError(f"CI must install {tool} (.ci/run does)")
        pytest.skip(f"needs {tool}", allow_module_level=True)


@pytest.fixture(scope="module")
def embedded(checkpoints, tmp_path_factory) -> dict[str, Path]:
    return compile_families(checkpoints, FAMILIES, "llvm", tmp_path_factory.mktemp("embed"), embed=True)


def pkg_config(artifact: Path) -> list[str]:
    env = {**os.environ, "PKG_CONFIG_PATH": str(artifact / "lib" / "pkgconfig")}
    done = subprocess.run(["pkg-config", "--cflags", "--libs", "g4c"], capture_output=True, text=True, env=env,
                          check=True)
    return done.stdout.split()


def build_app(artifact: Path, source: Path, out: Path, cc: str = "gcc", extra: tuple[str, ...] = ()) -> Path:
    """A C app built the way the README says: cc app.c $(pkg-config --cflags --libs g4c)."""
    subprocess.run([cc, *C_FLAGS, *extra, str(source), "-o", str(out), *pkg_config(artifact), "-lpthread"],
                   check=True, capture_output=True, text=True)
    return out


def run(command: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def tokens(stdout: str) -> list[int]:
    return [int(t) for t in stdout.strip().splitlines()[-1].split(",")]


def generate(app: list[str], artifact: Path, ids: list[int], new: int, logits: Path | None = None,
             **env) -> list[int]:
    command = [*app, str(artifact), ",".join(map(str, ids)), str(new), "--chunk", str(CHUNK), "--ignore-eos"]
    done = run(command + (["--logits", str(logits)] if logits else []), env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return tokens(done.stdout)


def python_reference(artifact: Path, ids: list[int], new: int) -> tuple[np.ndarray, list[int]]:
    session = load(artifact, prefill_chunk=CHUNK)
    logits = session.prefill(ids)
    session.reset()
    return logits, session.generate(ids, new)


def test_artifact_has_the_c_runtime(embedded):
    art = embedded["e"]
    for name in ("include/g4c.h", "include/g4c_model.h", "lib/libg4c.so", "lib/libtvm_ffi.so",
                 "lib/libtvm_runtime.so", "lib/pkgconfig/g4c.pc", "src/model.cpp", "src/session.cpp"):
        assert (art / name).is_file(), name
    header = (art / "include" / "g4c_model.h").read_text()
    vocab = load(art).vocab_size
    assert f"#define G4C_MODEL_VOCAB_SIZE {vocab}" in header and '#define G4C_MODEL_TARGET "llvm"' in header
    dynamic = run(["readelf", "-d", str(art / "lib" / "libg4c.so")]).stdout
    assert "[$ORIGIN]" in dynamic and "libtvm_runtime.so" in dynamic
    assert "prefix=${pcfiledir}/../.." in (art / "lib" / "pkgconfig" / "g4c.pc").read_text()


@pytest.mark.parametrize("family", FAMILIES)
def test_c_example_matches_python_and_transformers(family, embedded, references, tmp_path):
    art = embedded[family]
    app = build_app(art, EXAMPLE, tmp_path / "generate")
    out = tmp_path / "logits.bin"
    new = generate([str(app)], art, PROMPT, 32, out)
    logits, python_new = python_reference(art, PROMPT, 32)
    c_logits = np.fromfile(out, dtype=np.float32)
    assert np.abs(c_logits - logits).max() <= 1e-6  # the same kernels on the same buffers
    assert np.abs(c_logits - reference_logits(references[family], PROMPT)[-1]).max() <= 1e-4
    assert new == python_new == reference_greedy(references[family], PROMPT, 32)


def test_relocated_artifact_links_and_runs(embedded, tmp_path):
    """The directory can be copied anywhere: the pkg-config prefix is relative, libg4c.so finds its
    libraries through $ORIGIN, and nothing points back to the build machine's Python."""
    moved = tmp_path / "elsewhere" / "model.g4c"
    shutil.copytree(embedded["e"], moved)
    app = build_app(moved, EXAMPLE, tmp_path / "generate")
    listed = run(["ldd", str(app)], env={"LD_LIBRARY_PATH": ""}).stdout
    resolved = {line.split()[0]: Path(line.split()[2]).resolve() for line in listed.splitlines() if " => /" in line}
    assert resolved["libg4c.so"] == moved / "lib" / "libg4c.so"
    assert resolved["libtvm_runtime.so"].parent == resolved["libtvm_ffi.so"].parent == moved / "lib"
    assert generate([str(app)], moved, PROMPT[:6], 8) == generate([str(app)], embedded["e"], PROMPT[:6], 8)


def sanitized_library(art: Path, out: Path) -> Path:
    """lib/ with libg4c.so rebuilt from the artifact's own src/ under AddressSanitizer + UBSan, linked with
    the libraries the compiled one links (the Relax VM's or wgpu-native)."""
    shutil.copytree(art / "lib", out)
    if (out / "libwgpu_native.so").is_file():
        import wgpu

        include, links = Path(wgpu.__file__).parent / "resources", ["-l:libwgpu_native.so"]
    else:
        from tvm_ffi import libinfo

        include, links = Path(libinfo.find_include_path()), ["-l:libtvm_ffi.so", "-l:libtvm_runtime.so"]
    sources = sorted(str(p) for p in (art / "src").glob("*.cpp"))
    subprocess.run(["g++", "-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                    "-fno-sanitize-recover=undefined", "-fPIC", "-shared", f"-I{art / 'include'}",
                    f"-I{art / 'src'}", f"-I{include}", *sources, "-o", str(out / "libg4c.so"),
                    f"-L{out}", *links, "-Wl,-rpath,$ORIGIN", "-Wl,--disable-new-dtags"],
                   check=True, capture_output=True, text=True)
    return out


def sanitized_lifecycle(art: Path, tmp_path: Path) -> None:
    """open → prefill → 32 decodes → reset → the same again → close, twice, under ASan + UBSan (leaks
    included; wgpu-native's own 256 bytes, leaked by a bare instance + device too, are suppressed)."""
    lib = sanitized_library(art, tmp_path / "lib")
    app = tmp_path / "checks"
    subprocess.run(["gcc", *C_FLAGS, "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                    str(CHECKS), "-o", str(app), f"-I{art / 'include'}", f"-L{lib}", "-lg4c", f"-Wl,-rpath,{lib}",
                    "-lpthread"], check=True, capture_output=True, text=True)
    suppressions = tmp_path / "lsan.supp"
    suppressions.write_text("leak:libwgpu_native.so\nleak:libvulkan_lvp.so\n")
    done = run([str(app), "lifecycle", str(art), ",".join(map(str, PROMPT))],
               env={"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
                    "LSAN_OPTIONS": f"suppressions={suppressions}:print_suppressions=0",
                    "UBSAN_OPTIONS": "print_stacktrace=1"})
    assert done.returncode == 0 and "Sanitizer" not in done.stderr and "runtime error" not in done.stderr, \
        done.stderr[-3000:]
    lines = done.stdout.split()
    assert len(lines) == 4 and len(set(lines)) == 1  # two cycles, each twice around a reset: one continuation
    assert [int(t) for t in lines[0].split(",")] == python_reference(art, PROMPT, 33)[1]


def test_sanitizers_open_prefill_decode_reset_close_twice(embedded, tmp_path):
    sanitized_lifecycle(embedded["e"], tmp_path)


def test_two_sessions_in_two_threads_match_one_after_the_other(embedded, tmp_path):
    app = build_app(embedded["moe"], CHECKS, tmp_path / "checks")
    done = run([str(app), "threads", str(embedded["moe"]), ",".join(map(str, PROMPT)), "24"])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split()
    assert len(lines) == 4 and len(set(lines)) == 1


def test_bad_input_returns_codes_and_messages(embedded, tmp_path):
    art = embedded["e"]
    app = build_app(art, CHECKS, tmp_path / "checks")
    done = run([str(app), "bad", str(art), str(embedded["dense"])])
    assert done.returncode == 0, done.stderr
    results = {line.split(" ", 1)[0]: line.split(" ", 2)[1:] for line in done.stdout.splitlines()}
    expected = {"missing": (2, "no such artifact directory"), "other": (2, "not the artifact this library was generated for"),
                "null_dir": (1, "NULL"), "null_out": (1, "NULL"), "bad_options": (1, ">= 0"),
                "token_too_large": (3, "is outside the vocabulary (0.."),
                "token_negative": (3, "token id -5"), "past_context": (4, "exceeds the session's maximum (8)"),
                "empty_prompt": (1, "at least one token"), "null_ids": (1, "NULL"), "null_logits": (1, "NULL"),
                "null_session": (1, "NULL"), "decode_null": (1, "NULL"), "decode_outside": (3, "outside the vocabulary"),
                "generate_null": (1, "NULL"), "still_works": (0, "ok"), "decode_past_context": (4, "exceeds"),
                "bad_sampler": (1, "top_p")}
    for case, (code, message) in expected.items():
        assert int(results[case][0]) == code and message in results[case][1], (case, results[case])
    assert done.stdout.splitlines()[-1] == "null_queries 0 0 0"


def test_damaged_artifacts_are_refused(embedded, tmp_path):
    app = build_app(embedded["e"], EXAMPLE, tmp_path / "generate")
    modified = tmp_path / "modified"
    shutil.copytree(embedded["e"], modified)
    weights = modified / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x40
    weights.write_bytes(bytes(data))
    done = run([str(app), str(modified), "2,17", "4"])
    assert done.returncode == 1 and "weights.safetensors is corrupt or was modified (SHA-256 mismatch)" in done.stderr
    (modified / "host.safetensors").unlink()
    done = run([str(app), str(modified), "2,17", "4"])
    assert done.returncode == 1 and "host.safetensors is missing" in done.stderr
    (modified / "manifest.json").unlink()
    done = run([str(app), str(modified), "2,17", "4"])
    assert done.returncode == 1 and "is not a g4c artifact" in done.stderr
    assert done.stderr.count("\n") == 1  # one line


@pytest.mark.slow  # ~27 s of compiles to check an absence; CI time
def test_no_embed_and_seeded_artifacts_have_no_c_runtime(tmp_path):
    from g4c.cli import main

    assert main(["compile", "tiny-dense", "--random-weights", "-o", str(tmp_path / "a"), "--no-embed",
                 "--no-check"]) == 0
    assert not (tmp_path / "a" / "lib").exists()
    assert main(["compile", "tiny-dense", "--random-weights", "-o", str(tmp_path / "b"), "--no-check"]) == 0
    assert (tmp_path / "b" / "lib" / "libg4c.so").is_file() and (tmp_path / "b" / "include" / "g4c.h").is_file()
    assert main(["compile", "tiny-dense", "--random-weights", "--weights-from-seed", "-o", str(tmp_path / "c"),
                 "--no-check"]) == 0
    assert not (tmp_path / "c" / "lib").exists()  # no weight file to map: the Python runtime regenerates them


ARM_TOOLS = ("qemu-aarch64", "aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++")
needs_arm = pytest.mark.skipif(not all(shutil.which(t) for t in ARM_TOOLS) and not os.environ.get("CI"),
                               reason="needs qemu-user and the aarch64 cross gcc/g++")


@needs_arm
@pytest.mark.slow  # ~35 s under qemu; CI time (test_arm keeps an aarch64 run in the default suite)
def test_aarch64_app_under_qemu_matches_the_python_runtime(checkpoints, references, embedded, tmp_path):
    """The example cross-built for aarch64 against an `arm` artifact, run under qemu-aarch64 (Raspberry
    Pi 5 core), equals the Python runtime run in the emulated aarch64 Python (scripts/arm-emu.sh)."""
    art = compile_families(checkpoints, ["e"], "arm", tmp_path / "arm", embed=True)["e"]
    for name in ("libg4c.so", "libtvm_ffi.so", "libtvm_runtime.so"):
        assert int.from_bytes((art / "lib" / name).read_bytes()[18:20], "little") == 183  # ELF e_machine: AArch64
    app = build_app(art, EXAMPLE, tmp_path / "generate-aarch64", cc="aarch64-linux-gnu-gcc")
    out = tmp_path / "logits.bin"
    qemu = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", str(app)]
    new = generate(qemu, art, PROMPT, 32, out, QEMU_CPU="cortex-a76")
    script = ("import sys, numpy as np, g4c; s = g4c.load(sys.argv[1], prefill_chunk=int(sys.argv[2])); "
              "ids = [int(t) for t in sys.argv[3].split(',')]; np.save(sys.argv[4], s.prefill(ids)); s.reset(); "
              "print(','.join(map(str, s.generate(ids, 32))))")
    done = run([str(ROOT / "scripts" / "arm-emu.sh"), "python", "-c", script, str(art), str(CHUNK),
                ",".join(map(str, PROMPT)), str(tmp_path / "python.npy")], timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    c_logits = np.fromfile(out, dtype=np.float32)
    assert np.abs(c_logits - np.load(tmp_path / "python.npy")).max() <= 1e-6
    assert np.abs(c_logits - reference_logits(references["e"], PROMPT)[-1]).max() <= 1e-4
    assert new == tokens(done.stdout) == reference_greedy(references["e"], PROMPT, 32)
    # this machine's library refuses the aarch64 artifact in one line naming it
    host_app = build_app(embedded["e"], EXAMPLE, tmp_path / "generate")
    refused = run([str(host_app), str(art), "2,17", "4"])
    assert refused.returncode == 1 and "its manifest is for target arm:cortex-a76" in refused.stderr


@pytest.mark.parametrize("runtime_memory", ["0", "1"])
def test_static_decode_and_device_memory_paths(checkpoints, runtime_memory, tmp_path):
    """What a CUDA artifact's library does, run on the CPU: a static decode (fixed input tensors, whole
    caches: what a CUDA graph replays) and buffers in TVM runtime tensors with copies and views
    (G4C_RUNTIME_MEMORY=1), against the Python runtime doing the same (runtime_memory=True)."""
    art = compile_families(checkpoints, ["moe"], "llvm", tmp_path / "static", embed=True, static_decode=True)["moe"]
    app = build_app(art, EXAMPLE, tmp_path / "generate")
    out = tmp_path / "logits.bin"
    new = generate([str(app)], art, PROMPT, 16, out, G4C_RUNTIME_MEMORY=runtime_memory)
    session = load(art, prefill_chunk=CHUNK, runtime_memory=True)
    assert np.abs(np.fromfile(out, dtype=np.float32) - session.prefill(PROMPT)).max() <= 1e-6
    session.reset()
    assert new == session.generate(PROMPT, 16)


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CI"), reason="needs nvcc")
def test_cuda_artifact_c_runtime_builds_and_says_what_it_lacks(checkpoints, tmp_path):
    """A CUDA artifact's library links only the TVM runtime; CUDA's module loader and runtime ship in lib/
    and load when a session opens, so an app links anywhere and, on a machine without the GPU driver,
    g4c_open says so in one line (on a GPU machine it runs: scripts/gpu_check.sh)."""
    art = compile_families(checkpoints, ["e"], "cuda", tmp_path / "cuda", embed=True)["e"]
    for name in ("libtvm_runtime_cuda.so", "libcudart.so.13", "libtvm_runtime.so", "libtvm_ffi.so"):
        assert (art / "lib" / name).is_file()
    needed = run(["readelf", "-d", str(art / "lib" / "libg4c.so")]).stdout
    assert "libtvm_runtime.so" in needed and "libtvm_runtime_cuda.so" not in needed and "libcudart" not in needed
    app = build_app(art, EXAMPLE, tmp_path / "generate")
    done = run([str(app), str(art), "2,17", "4"])
    if done.returncode == 1:  # no NVIDIA driver here
        assert "cannot load libtvm_runtime_cuda.so: libcuda.so.1" in done.stderr and done.stderr.count("\n") == 1
    else:
        assert done.returncode == 0, done.stderr


def _vulkan_device() -> bool:
    try:
        import wgpu

        return wgpu.gpu.request_adapter_sync(power_preference="high-performance") is not None
    except Exception:  # noqa: BLE001 - no wgpu, no wgpu-native, no driver
        return False


needs_vulkan = pytest.mark.skipif(not os.environ.get("CI") and not _vulkan_device(),
                                  reason="needs wgpu and a Vulkan device (mesa-vulkan-drivers)")


@pytest.fixture(scope="module")
def vulkan_embedded(checkpoints, tmp_path_factory) -> dict[str, Path]:
    return compile_families(checkpoints, ["e", "moe"], "vulkan", tmp_path_factory.mktemp("vk"), embed=True)


@needs_vulkan
@pytest.mark.parametrize("family", ["e", "moe"])
def test_vulkan_c_example_matches_python_and_transformers(family, vulkan_embedded, references, tmp_path):
    """The C runtime drives the artifact's WGSL kernels through wgpu-native's C API (lavapipe here)."""
    art = vulkan_embedded[family]
    assert (art / "lib" / "libwgpu_native.so").is_file() and "libwgpu_native.so" in \
        run(["readelf", "-d", str(art / "lib" / "libg4c.so")]).stdout
    app = build_app(art, EXAMPLE, tmp_path / "generate")
    out = tmp_path / "logits.bin"
    new = generate([str(app)], art, PROMPT, 32, out)
    logits, python_new = python_reference(art, PROMPT, 32)
    c_logits = np.fromfile(out, dtype=np.float32)
    assert np.abs(c_logits - logits).max() <= 1e-6
    assert np.abs(c_logits - reference_logits(references[family], PROMPT)[-1]).max() <= 1e-4
    assert new == python_new == reference_greedy(references[family], PROMPT, 32)


@needs_vulkan
@pytest.mark.slow  # ~30 s; CI time (the llvm sanitizer test stays in the default suite)
def test_vulkan_sanitizers_and_bad_input(vulkan_embedded, tmp_path):
    sanitized_lifecycle(vulkan_embedded["e"], tmp_path / "asan")
    app = build_app(vulkan_embedded["e"], CHECKS, tmp_path / "checks")
    done = run([str(app), "bad", str(vulkan_embedded["e"]), str(vulkan_embedded["moe"])])
    assert done.returncode == 0, done.stderr
    results = {line.split(" ", 1)[0]: line.split(" ", 2)[1:] for line in done.stdout.splitlines()}
    assert results["other"][0] == "2" and "another vulkan:generic artifact" in results["other"][1]
    assert results["past_context"][0] == "4" and results["token_too_large"][0] == "3"
    assert results["still_works"] == ["0", "ok"]
