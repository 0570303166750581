"""The embeddable C runtime of an artifact: `lib/libg4c.so`, `include/g4c.h`, `include/g4c_model.h`,
`lib/pkgconfig/g4c.pc`, generated from the artifact and built at compile time.

The library is C++ rendered from jinja2 templates (`templates/`) and specialised to one artifact: what
the Python runtime reads from the manifest at load time (entry order of the weights and their offsets
in the mapped weight file, the KV plan, the PLE table's layout and quantization, the files' SHA-256,
for Vulkan every program step, launch record and WGSL kernel) is written into `src/model.cpp` as
constants and code, so the device needs no manifest parser, no Python and no compiler. The session
logic (`session.cpp`) is the Python runtime's (`g4c/runtime/session.py`) line for line; the tests run
both on the same artifacts token for token. Executors: `vm_executor.cpp` (TVM's Relax VM through the
tvm-ffi C++ API, for CPU and CUDA artifacts) and `wgpu_executor.cpp` (wgpu-native's C API, for Vulkan).

The target says how to build (`Target.embed_toolchain()`: the C++ compiler of the device's machine and
the shared libraries to link and ship in lib/, found through the library's `$ORIGIN` rpath). The
objects of the artifact-independent sources are cached by content under $G4C_CACHE/embed, so a
compile rebuilds only model.cpp.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import jinja2
import numpy as np

from g4c import __version__
from g4c.artifact import HOST, MANIFEST, SHADERS, WEIGHTS, Manifest, safetensors_layout, sha256_file, split_source
from g4c.config import config_from_dict
from g4c.errors import G4CError

TEMPLATES = Path(__file__).parent / "templates"
HEADER = "g4c.h"
STATIC_SOURCES = {"vm": ("session.cpp", "sha256.cpp", "vm_executor.cpp"),
                  "wgpu": ("session.cpp", "sha256.cpp", "wgpu_executor.cpp")}
CXX_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-DNDEBUG")
DEFAULT_MAX_CONTEXT = 4096  # g4c.runtime.session: a session's context unless asked otherwise
DTYPES = {"float32": "F32", "float16": "F16", "uint16": "BF16", "int32": "I32", "int64": "I64", "uint32": "U32",
          "uint8": "U8"}  # numpy storage → internal.h DType (bf16 is stored as uint16)
REF_KINDS = {"in": "Input", "w": "Weight", "a": "Activation", "kv": "Cache"}
PROGRAM_ORDER = ("prefill", "prefill_all", "decode", "prefill_media", "prefill_all_media", "encode_image",
                 "encode_audio")  # internal.h enum Program
# the inputs session.cpp makes for each program: name → "index" (the artifact's index dtype) or a dtype
_TEXT = {"ids": "index", "positions": "index"}
_MEDIA = {**_TEXT, "soft": "float32", "soft_mask": "index", "reach": "index"}
PROGRAM_INPUTS = {"prefill": _TEXT, "prefill_all": _TEXT, "decode": _TEXT, "prefill_media": _MEDIA,
                  "prefill_all_media": _MEDIA,
                  "encode_image": {"patches": "float32", "patch_positions": "index", "patch_x": "index",
                                   "patch_y": "index", "positions": "index", "reach": "index", "pool": "index"},
                  "encode_audio": {"features": "float32", "conv0_frames": "index", "frames": "index"}}
RUNTIME_STEPS = {"rows": "Rows", "last": "Last", "reshape": "Reshape"}

Progress = Callable[[str, int, int], None]


def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=True)


def _tensor(name: str, info: tuple) -> str:
    dtype, shape, (begin, end) = info
    dims = ", ".join(str(int(d)) for d in shape) or "0"
    return (f'{{"{name}", DType::{DTYPES[np.dtype(dtype).name]}, {len(shape)}, {{{dims}}}, {begin}ull, '
            f'{end}ull}}')


NO_TENSOR = '{nullptr, DType::F32, 0, {0}, 0ull, 0ull}'


def _host_table(directory: Path, manifest: Manifest) -> tuple[dict, int]:
    if not manifest.host_tables:
        return {"bits": 0, "data": NO_TENSOR, "scales": NO_TENSOR}, 0
    (table,) = manifest.host_tables
    layout, start = safetensors_layout(directory / HOST)
    q = manifest.host_quant
    if q is None:
        return {"bits": 0, "data": _tensor(table, layout[table]), "scales": NO_TENSOR}, start
    bits = {"q8": 8, "q4": 4, "q3": 3}[q]
    return {"bits": bits, "data": _tensor(f"{table}.{q}", layout[f"{table}.{q}"]),
            "scales": _tensor(f"{table}.{q}_scales", layout[f"{table}.{q}_scales"])}, start


def _grid(tree) -> str:
    """A launch-size expression tree (`g4c.codegen.wgsl`) as C++ over the uniform words `w`."""
    if isinstance(tree, int):
        return f"int64_t({tree})"
    op, a = tree[0], tree[1]
    if op == "arg":
        return f"w[{a}]"
    x, y = _grid(a), _grid(tree[2])
    calls = {"//": "fdiv", "%": "fmod_", "min": "std::min<int64_t>", "max": "std::max<int64_t>"}
    return f"{calls[op]}({x}, {y})" if op in calls else f"({x} {op} {y})"


def _program_inputs(manifest: Manifest, name: str) -> list[tuple[str, list, str]]:
    """A program's runtime inputs [name, shape, dtype] in entry order (text programs: ids, positions)."""
    program = manifest.programs[name]
    return [tuple(i) for i in program.inputs] or [("ids", ["T"], manifest.index_dtype),
                                                  ("positions", ["T"], manifest.index_dtype)]


def _unsupported(manifest: Manifest, name: str) -> str | None:
    """Why session.cpp cannot feed this program's inputs (a name or dtype it does not make), or None."""
    index = manifest.index_dtype
    for input_name, _, dtype in _program_inputs(manifest, name):
        expected = PROGRAM_INPUTS[name].get(input_name)
        if expected is None or dtype != (index if expected == "index" else expected):
            return f"the C runtime of g4c {__version__} cannot make input {input_name} ({dtype}) of {name}"
    return None


def _symbols(manifest: Manifest) -> list[str]:
    """The symbolic dims of the programs' inputs and activations: T first, S second, then the others."""
    found = {d for name in PROGRAM_ORDER if name in manifest.programs
             for shape, _ in [*manifest.programs[name].buffers.values(),
                              *((s, d) for _, s, d in _program_inputs(manifest, name))]
             for d in shape if isinstance(d, str)}
    return ["T", "S", *sorted(found - {"T", "S"})]


def _programs(manifest: Manifest, kernel_index: dict[str, int], symbols: list[str]) -> list[dict]:
    weights = {n: i for i, n in enumerate(manifest.entry.weights)}
    slots = {n: i for i, n in enumerate(manifest.entry.caches)}
    symbol = {d: -(i + 1) for i, d in enumerate(symbols)}

    def info(name: str, shape: list, dtype: str) -> str:
        dims = ", ".join(str(symbol[d]) if isinstance(d, str) else str(int(d)) for d in shape) or "0"
        return f'{{"{name}", DType::{DTYPES[dtype]}, {len(shape)}, {{{dims}}}}}'

    out = []
    for name in PROGRAM_ORDER:
        if name not in manifest.programs:
            continue
        program = manifest.programs[name]
        buffers, inputs = list(program.buffers), _program_inputs(manifest, name)
        index = {"in": {n: i for i, (n, _, _) in enumerate(inputs)}, "w": weights,
                 "a": {b: i for i, b in enumerate(buffers)}, "kv": slots}

        def ref(text: str) -> str:
            kind, _, rest = text.partition(":")
            return f"{{RefKind::{REF_KINDS[kind]}, {index[kind][rest]}}}"

        steps = []
        if manifest.runtime == "wgpu":
            for step in program.steps:
                kind = RUNTIME_STEPS.get(step.kernel, "Kernel")
                steps.append({"kind": kind, "kernel": kernel_index.get(step.kernel, -1) if kind == "Kernel" else -1,
                              "args": [ref(a) for a in step.args]})
        (output,) = program.outputs.values()  # logits, or an encoder's embeddings
        out.append({"name": name, "enum": name.upper(), "buffers": [info(b, *program.buffers[b]) for b in buffers],
                    "inputs": [info(*i) for i in inputs], "rows": program.ple_width() is not None,
                    "steps": steps, "output": buffers.index(output[2:]), "unsupported": _unsupported(manifest, name)})
    return out


def _media(manifest: Manifest) -> dict:
    """The MediaInfo of internal.h: special tokens, mask rule, towers and the processor's numbers."""
    from g4c.media import ProcessorConfig

    none = {"present": False, "image": False, "audio": False, "bidirectional_vision": False,
            "tokens": [-1] * 6, "pad": -1, "image_cfg": None, "audio_cfg": None, "seq": [0, 0, 0], "json": "{}"}
    if not manifest.media:
        return none
    media = manifest.media
    processor = ProcessorConfig.from_dict(media["processor"])
    tokens = [media["tokens"].get(t) for t in ("image", "boi", "eoi", "audio", "boa", "eoa")]

    def c_float(x: float) -> str:
        return f"{float(x)!r}f"

    image = processor.image
    audio = processor.audio
    return {"present": True, "image": "image" in media["towers"], "audio": "audio" in media["towers"],
            "bidirectional_vision": bool(media["bidirectional_vision"]),
            "tokens": [-1 if t is None else int(t) for t in tokens], "pad": int(media["pad_token_id"]),
            "image_cfg": None if image is None else {
                "ints": [image.patch_size, image.pooling_kernel_size, image.max_soft_tokens, int(image.do_resize),
                         image.resample, int(image.do_rescale), int(image.do_normalize), int(image.do_convert_rgb)],
                "rescale": repr(float(image.rescale_factor)),
                "mean": [c_float(x) for x in image.image_mean], "std": [c_float(x) for x in image.image_std]},
            "audio_cfg": None if audio is None else {
                "ints": [audio.sampling_rate, audio.n_mels, audio.frame_length, audio.hop_length, audio.fft_length,
                         audio.max_length],
                "floats": [c_float(audio.min_frequency), c_float(audio.max_frequency), c_float(audio.mel_floor)]},
            "seq": [processor.image_seq_length, processor.audio_seq_length, processor.audio_ms_per_token],
            "json": json.dumps(media["processor"], sort_keys=True)}


def _launch_tables(directory: Path, manifest: Manifest) -> dict:
    """kernels (first launch, count), launches, grid functions and WGSL sources of a wgpu artifact."""
    if manifest.runtime != "wgpu":
        return {"kernels": [], "launches": [], "grids": [], "shaders": [], "kernel_index": {}}
    sources = split_source((directory / SHADERS).read_text())
    used = sorted({x["kernel"] for group in manifest.launches.values() for x in group})
    missing = [k for k in used if k not in sources]
    if missing:
        raise G4CError(f"{SHADERS} has no kernel {missing[0]}")
    shader_index = {k: i for i, k in enumerate(used)}
    kernels, launches, grids, grid_index = [], [], [], {}

    def grid(tree) -> int:
        code = _grid(tree)
        if code not in grid_index:
            grid_index[code] = len(grids)
            grids.append(code)
        return grid_index[code]

    for name in sorted(manifest.launches):
        kernels.append({"name": name, "first": len(launches), "count": len(manifest.launches[name])})
        for x in manifest.launches[name]:
            launches.append({"name": x["kernel"], "shader": shader_index[x["kernel"]], "buffers": x["buffers"],
                             "scalars": [f"{{{p}, {d}}}" for p, d in x["scalars"]],
                             "grid": [grid(x["grid"][0]), grid(x["grid"][1])]})
    shaders = [{"name": k, "wgsl": sources[k]} for k in used]
    return {"kernels": kernels, "launches": launches, "grids": grids, "shaders": shaders,
            "kernel_index": {k["name"]: i for i, k in enumerate(kernels)}}


def model_context(directory: Path, manifest: Manifest, max_binding: int = 0) -> dict:
    """What the templates are rendered with: the artifact's constants and tables."""
    model = config_from_dict(manifest.config, source=str(directory / MANIFEST))
    eos = manifest.config.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    files = [{"name": n, "sha256": d, "size": (directory / n).stat().st_size} for n, d in sorted(manifest.files.items())]
    weights, start = [], 0
    needs_f16 = manifest.weight_dtype == "float16"
    if manifest.weights_from_seed is None:
        layout, start = safetensors_layout(directory / WEIGHTS)
        missing = [n for n in manifest.entry.weights if n not in layout]
        if missing:
            raise G4CError(f"{WEIGHTS} lacks {missing[0]}, which the entry functions take")
        weights = [_tensor(n, layout[n]) for n in manifest.entry.weights]
        # as the wgpu runtime decides: shader-f16 when any device weight is stored as float16
        needs_f16 = any(np.dtype(layout[n][0]) == np.float16 for n in manifest.entry.weights)
    host, host_start = _host_table(directory, manifest)
    tables = _launch_tables(directory, manifest)
    symbols = _symbols(manifest)
    ple_width = manifest.programs["decode"].ple_width() or 0
    slots = [{"name": s, "kv_heads": manifest.kv_slots[s].kv_heads, "head_dim": manifest.kv_slots[s].head_dim,
              "window": manifest.kv_slots[s].window if manifest.kv_slots[s].ring else 0} for s in manifest.entry.caches]
    return {"g4c_version": __version__, "target": manifest.target, "runtime": manifest.runtime,
            "library": manifest.library, "manifest_sha256": sha256_file(directory / MANIFEST),
            "device": manifest.device, "device_type": manifest.device_type, "vocab_size": model.input_vocab_size,
            "max_positions": model.max_position_embeddings, "default_max_context": DEFAULT_MAX_CONTEXT,
            "index_bits": np.dtype(manifest.index_dtype).itemsize * 8, "has_ple": manifest.has_ple,
            "static_decode": manifest.static_decode, "eos": eos, "bos": manifest.config.get("bos_token_id", -1),
            "needs_f16": needs_f16, "files": files, "weights": weights,
            "weights_data_start": start, "host": host, "host_data_start": host_start, "ple_width": ple_width,
            "slots": slots, "max_binding": max_binding,
            "programs": _programs(manifest, tables["kernel_index"], symbols),
            "program_order": [n.upper() for n in PROGRAM_ORDER], "symbols": symbols, "media": _media(manifest),
            "hidden_size": model.hidden_size,
            "architecture": manifest.config.get("model_type", "gemma4"), "layers": model.num_hidden_layers,
            "sliding_window": model.sliding_window or 0, "weight_dtype": manifest.weight_dtype,
            "quant": manifest.quant or "none", "host_quant": manifest.host_quant or "none", **tables}


def _cache_dir() -> Path:
    return Path(os.environ.get("G4C_CACHE", Path.home() / ".cache" / "g4c")) / "embed"


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.strip().splitlines()
        raise G4CError(f"building the C runtime failed ({what}): {lines[0] if lines else 'compiler error'}")


def _object(source: Path, toolchain, includes: list[str], cached: bool) -> Path:
    """The object file of one source: from the content-addressed cache when `cached` (artifact-independent
    sources), compiled otherwise."""
    flags = [*CXX_FLAGS, *toolchain.flags, *includes]
    key = hashlib.sha256("\0".join([toolchain.cxx, *flags, source.read_text(),
                                    (TEMPLATES / "internal.h").read_text(), (TEMPLATES / HEADER).read_text()])
                         .encode()).hexdigest()[:32]
    out = _cache_dir() / f"{source.stem}-{key}.o" if cached else source.with_suffix(".o")
    if cached and out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f"{out.name}.{os.getpid()}.partial")
    _run([toolchain.cxx, *flags, "-c", str(source), "-o", str(partial)], source.name)
    partial.replace(out)  # atomic: concurrent compiles share the cache
    return out


def write_embed(directory: Path, manifest: Manifest, toolchain, max_binding: int = 0,
                progress: Progress | None = None) -> None:
    """Write include/, src/, lib/libg4c.so (+ the libraries it needs) and lib/pkgconfig/g4c.pc into an
    artifact directory whose other files and manifest are written."""
    if manifest.weights_from_seed is not None:
        raise G4CError("--weights-from-seed artifacts have no C runtime (it maps the weight file): add --no-embed")
    if manifest.prepare:
        raise G4CError(f"the C runtime is not built for {manifest.target} artifacts here: add --no-embed")
    report = progress or (lambda stage, done, total: None)
    report("building the C runtime", 0, 1)
    env, context = _environment(), model_context(directory, manifest, max_binding)
    context["loaded"] = [_shipped_name(library) for library in toolchain.loaded]
    include, src, lib = directory / "include", directory / "src", directory / "lib"
    for folder in (include, src, lib / "pkgconfig"):
        folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(TEMPLATES / HEADER, include / HEADER)
    (include / "g4c_model.h").write_text(env.get_template("g4c_model.h.j2").render(**context))
    (src / "model.cpp").write_text(env.get_template("model.cpp.j2").render(**context))
    for name in (*STATIC_SOURCES[toolchain.executor], "internal.h"):
        shutil.copy(TEMPLATES / name, src / name)
    (lib / "pkgconfig" / "g4c.pc").write_text(env.get_template("g4c.pc.j2").render(**context))
    for library in (*toolchain.libraries, *toolchain.loaded):
        shutil.copy(library, lib / _shipped_name(library))
    includes = [f"-I{include}", f"-I{src}", *(f"-I{d}" for d in toolchain.include_dirs)]
    objects = [_object(src / name, toolchain, includes, cached=True) for name in STATIC_SOURCES[toolchain.executor]]
    objects.append(_object(src / "model.cpp", toolchain, includes, cached=False))
    links = [f"-l:{_shipped_name(library)}" for library in toolchain.libraries]
    _run([toolchain.cxx, "-shared", "-o", str(lib / "libg4c.so"), *map(str, objects), f"-L{lib}", "-Wl,--no-as-needed",
          *links, "-Wl,--as-needed", "-Wl,-rpath,$ORIGIN", "-Wl,--disable-new-dtags", "-Wl,-soname,libg4c.so",
          "-ldl", "-lpthread"], "link")
    (src / "model.o").unlink(missing_ok=True)
    report("building the C runtime", 1, 1)


def _shipped_name(library: Path) -> str:
    """The name a library gets in lib/ (wgpu's wheel calls it libwgpu_native-release.so)."""
    return "libwgpu_native.so" if library.name.startswith("libwgpu_native") else library.name
