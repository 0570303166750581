"""Compile a model into an artifact directory: the pipeline from checkpoint to files.

    config + weights → frontend graphs (prefill, prefill_all, decode) → passes → lowering to kernel
    specs (`g4c.codegen.lower`) → the target builds and schedules each kernel and the library
    (`g4c.targets`) → the artifact: library files, packed weights, host tables, manifest (`g4c.artifact`).

    DIR/kernels.so              the Relax VM executable (`prefill`, `prefill_all`, `decode` entry functions) and
                                every TensorIR kernel (each target writes its own library files: CUDA with an
                                nvcc fatbin; Metal kernels.tar + kernels.metal + link.sh; Vulkan kernels.wgsl)
    DIR/weights.safetensors     weights as the kernels want them (q/k/v and gate/up packed, RoPE tables)
    DIR/host.safetensors        tables kept in host memory and gathered row by row (the PLE table)
    DIR/manifest.json           `g4c.artifact.Manifest` (docs/artifact-format.md)
    DIR/lib*.so*                with --bundle-runtime: the TVM runtime libraries the target needs
    DIR/include, DIR/lib, DIR/src   the C runtime (`g4c.embed`): g4c.h, g4c_model.h, libg4c.so + what it links, g4c.pc
    (--weights-from-seed: no weights/host files; the runtime regenerates them from the seed)

The directory is written under a temporary name and renamed when complete: a failed compile leaves
nothing behind.
"""

from __future__ import annotations

import functools
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from g4c.artifact import (HOST, WEIGHTS, Manifest, derived_shape, derived_weight, source_tensors, tensor_bytes,
                          write_safetensors)
from g4c.artifact.libraries import find_runtime_library
from g4c.atomic import atomic_directory, check_writable
from g4c.config import ModelConfig
from g4c.dtypes import canonical_dtype, dtype_name, numpy_dtype
from g4c.errors import G4CError, WeightError
from g4c.frontend import build_graph
from g4c.passes import DEFAULT_PIPELINE, PassContext, PassManager
from g4c.quant import part_dtype, quant_scheme
from g4c.weights import Weights

PROGRAMS = {"prefill": ("prefill", 1), "prefill_all": ("prefill", None), "decode": ("decode", None)}

Progress = Callable[[str, int, int], None]


MEDIA_PROGRAMS = {"prefill_media": 1, "prefill_all_media": None}  # a prompt with soft tokens: logits kept


def optimized_graphs(cfg: ModelConfig, weights: Weights) -> dict:
    """The programs' optimized graphs: the text model's, and with a multimodal checkpoint's encoders
    (`weights.media`) the media prefills and the encoders (`encode_image`, `encode_audio`)."""
    ctx = PassContext(cfg, weights.f32)
    graphs = {name: build_graph(cfg, mode, keep) for name, (mode, keep) in PROGRAMS.items()}
    if weights.media is not None:
        graphs.update({name: build_graph(cfg, "prefill", keep, media=True) for name, keep in MEDIA_PROGRAMS.items()})
        graphs.update(weights.media.graphs())
    return {name: PassManager(DEFAULT_PIPELINE).run(graph, ctx) for name, graph in graphs.items()}


def compile_model(cfg: ModelConfig, weights: Weights, target_name: str, out_dir: str | Path,
                  overwrite: bool = False, progress: Progress | None = None, dtype: str = "float32",
                  bundle_runtime: bool = False, weights_from_seed: bool = False,
                  static_decode: bool | None = None, quant: str | None = None, quant_ple: str | None = None,
                  quant_dot: str = "float", embed: bool = False, tuning_db: str | Path | None = None) -> Path:
    """Lower, schedule, build and write an artifact (see the module docstring). `bundle_runtime` copies
    the TVM runtime libraries the target needs into it; `weights_from_seed` (random weights only)
    writes no weight files: the runtime regenerates them from the seed, so a benchmark artifact of a
    full-size model stays a few MB. `static_decode` (default: the target's choice, on for CUDA and
    Metal) makes `decode` a fixed-shape function the runtime calls with the same tensors every step
    (see `relax_module.build_module`), which CUDA replays as one graph. `quant_dot` "int8" multiplies
    quantized weights with int8-quantized activations by integer dot products (`codegen.int_dot`,
    llama.cpp's arithmetic: faster, not exact on the dequantized weights); "float" (default) keeps fp32
    activations. `quant_ple` None: a GGUF file's Q4_0/Q8_0 PLE table as stored, else as `quant`. `embed`
    adds the C runtime (`g4c.embed`: include/, lib/libg4c.so, lib/pkgconfig/g4c.pc) on targets that have
    one (`Target.embed_toolchain()`), except to --weights-from-seed artifacts, which have no weight file.
    `tuning_db` (a `g4c tune` database): kernels with a record that beats their hand schedule are
    scheduled with its knobs; the manifest lists them (`tuned_kernels`)."""
    from g4c.codegen.kernels import STORAGE
    from g4c.codegen.relax_module import signature
    from g4c.targets.registry import get_target

    target = get_target(target_name)
    static_decode = target.static_decode if static_decode is None else static_decode
    seed = _seed_of(weights) if weights_from_seed else None
    libraries = _runtime_libraries(target) if bundle_runtime else []
    toolchain = target.embed_toolchain() if embed and seed is None else None  # fails before minutes of building
    out = Path(out_dir)
    check_writable(out, overwrite)  # before minutes of building
    report = progress or (lambda stage, done, total: None)
    graphs, lowered = lowered_model(cfg, weights, target, dtype, quant, quant_ple, quant_dot)
    entry = signature(lowered)
    specs = _weight_specs(lowered, entry.weights, weights)
    target.check_weights(lowered.weight_dtype, {n: tensor_bytes(*s) for n, s in specs.items()})
    names = sorted(lowered.kernels)
    tuned = _tuned_knobs(tuning_db, target, lowered)
    scheduled = {}
    for i, name in enumerate(names):
        scheduled[name] = target.kernel(lowered.kernels[name], tuned.get(name, {}).get("knobs"))
        report("scheduling kernels", i + 1, len(names))
    report("building library", 0, 1)
    t0 = time.time()
    storage = {name: (shape, STORAGE[dtype_name(dtype)]) for name, (shape, dtype) in specs.items()}
    built = target.build(lowered, entry, scheduled, storage, static_decode)
    build_seconds = time.time() - t0
    report("building library", 1, 1)

    with atomic_directory(out, overwrite) as tmp:
        built.write(tmp)
        if seed is None:
            _write_weights(tmp, lowered, specs, weights, report)
            _write_host_tables(tmp, lowered, weights)
        for library in libraries:
            shutil.copy(library, tmp / library.name)
        manifest = _manifest(cfg, target, lowered, entry, static_decode, **built.manifest, weights_from_seed=seed,
                             converted_tensors=_converted_tensors(lowered, weights.source) if seed is None else {},
                             kv_plan=graphs["decode"].meta.get("kv_plan", []), build_seconds=round(build_seconds, 2),
                             tuned_kernels=tuned, media=weights.media)
        manifest.write(tmp)
        if toolchain is not None:
            from g4c.embed import write_embed

            write_embed(tmp, manifest, toolchain, max_binding=target.lowering.max_binding or 0, progress=report)
    return out


def lowered_model(cfg: ModelConfig, weights: Weights, target, dtype: str = "float32", quant: str | None = None,
                  quant_ple: str | None = None, quant_dot: str = "float"):
    """(optimized graphs, lowering) of a model for a target: what `compile_model` builds and `g4c tune`
    extracts its kernels from."""
    from g4c.codegen.lower import lower

    graphs = optimized_graphs(cfg, weights)
    lowered = lower(cfg, graphs, lowering_options(target, quant_dot), canonical_dtype(dtype), quant=quant_scheme(quant),
                    host_quant=_host_quant(quant_ple, quant, weights.source), stored_scheme=_stored_scheme(weights.source))
    return graphs, lowered


def _tuned_knobs(tuning_db, target, lowered) -> dict[str, dict]:
    """kernel name → {"space", "knobs", "speedup"} from a tuning database's best records (kernels without one
    keep their hand schedule)."""
    if tuning_db is None:
        return {}
    from g4c.tuning import TuningDB
    from g4c.tuning.tuner import kernel_key

    best = TuningDB(tuning_db).best_by_kernel()
    tuned = {}
    for name, spec in lowered.kernels.items():
        if not target.knob_space(spec):
            continue
        record = best.get(kernel_key(target, spec))
        if record is not None:
            tuned[name] = {"space": record.space, "knobs": record.candidate, "speedup": round(record.speedup, 3)}
    return tuned


QUANT_DOTS = ("float", "int8")


def lowering_options(target, quant_dot: str):
    """The target's lowering options, with integer dot products for quantized linears when asked
    (`--quant-dot int8`; a target without such instructions is refused)."""
    if quant_dot not in QUANT_DOTS:
        raise G4CError(f"unknown --quant-dot {quant_dot!r}: use {' or '.join(QUANT_DOTS)}")
    if quant_dot == "float":
        return target.lowering
    if target.int8_dot is None:
        raise G4CError(f"target {target.name} has no integer dot-product kernels (x86 with AVX-512 VNNI has): "
                       "use --quant-dot float")
    return replace(target.lowering, int8_dot=True)


def _manifest(cfg: ModelConfig, target, lowered, entry, static_decode: bool, **fields) -> Manifest:
    """The manifest of an artifact: the target's requirements, the lowering's programs and kernel
    specs, storage dtypes and recipes (`fields`: what the build and the caller add)."""
    import tvm

    requirements = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(target.requirements()).items()}
    media = fields.pop("media", None)
    return Manifest(target=target.name, target_spec=str(target.tvm_target()), config=cfg.to_hf_dict(),
                    media=media.spec.to_json() if media is not None else None,
                    runtime=target.runtime, entry=entry,
                    kernels={name: spec.to_json() for name, spec in lowered.kernels.items()},
                    programs=lowered.programs, kv_slots=lowered.kv_slots, **requirements,
                    static_decode=static_decode and target.runtime == "relax-vm", index_dtype=lowered.index_dtype,
                    weight_dtype=lowered.weight_dtype, weight_dtype_tensors=sorted(lowered.weight_dtype_tensors),
                    weight_recipes=lowered.recipes, host_tables=lowered.host_tables, quant=lowered.quant,
                    host_quant=lowered.host_quant, tvm_version=tvm.__version__,
                    **fields)


PLE_TABLE = "embed_tokens_per_layer.weight"


def _host_quant(quant_ple: str | None, quant: str | None, source) -> str | None:
    """The host tables' quantization: --quant-ple when given; else the PLE table's own blocks when the
    checkpoint stores it as Q4_0/Q8_0 (kept as stored, like the matrices), else as --quant."""
    if quant_ple is not None:
        return quant_scheme(quant_ple, host=True)
    stored = _stored_scheme(source)
    if stored is not None and PLE_TABLE in source.names() and (scheme := stored(PLE_TABLE)) is not None:
        return scheme
    return quant_scheme(quant)


def _converted_tensors(lowered, source) -> dict[str, dict]:
    """The checkpoint tensors stored in a type g4c has no kernels for (`source.ggml_type`: a GGUF file's
    K-quants, Q5_0, ...), what the artifact holds instead and the error that added (the largest |Δw|):
    compiled as float32 they keep their exact values (0); in fp16/bf16 (--dtype) or quantized (--quant,
    --quant-ple) they are rounded again. A stored Q4_0/Q8_0 tensor compiled in its own scheme is not converted."""
    from g4c.quant import dequantize, quantize

    kind = getattr(source, "ggml_type", None)
    if kind is None:
        return {}
    native = getattr(source, "quantized_scheme", lambda name: None)
    schemes = {leaf: recipe["quant"][1] for recipe in lowered.recipes.values()
               if "quant" in recipe and recipe["quant"][2] == "data"
               for leaf in source_tensors(recipe["quant"][0], lowered.recipes)}
    schemes.update({table: lowered.host_quant for table in lowered.host_tables if lowered.host_quant})
    out = {}
    for name in sorted(source.names()):
        stored, scheme = kind(name), schemes.get(name)
        if stored in ("F32", "F16", "BF16") or (native(name) is not None and native(name) == scheme):
            continue
        held, error = scheme or lowered.weight_dtype, 0.0
        if held != "float32":
            w = np.asarray(source.get(name), dtype=np.float32)
            rounded = dequantize(*quantize(w, scheme, "uint8"), scheme) if scheme else \
                w.astype(numpy_dtype(held)).astype(np.float32)
            error = float(np.abs(rounded - w).max())
        out[name] = {"stored": stored, "as": held, "max_abs_error": error}
    return out


def _stored_scheme(source) -> Callable[[str], str | None] | None:
    """The scheme a weight source stores a tensor in (`quantized_scheme`, or the first element of
    `quantized`), for sources with quantized tensors (GGUF files); None for float sources."""
    if hasattr(source, "quantized_scheme"):
        return source.quantized_scheme
    if hasattr(source, "quantized"):
        return lambda name: (source.quantized(name) or (None,))[0]
    return None


def _seed_of(weights: Weights) -> dict:
    from g4c.weights import RandomWeights

    if weights.media is not None:
        raise G4CError("--weights-from-seed does not regenerate the vision/audio encoders: compile this multimodal "
                       "model without it (its weights are then written)")
    if not isinstance(weights.source, RandomWeights):
        raise G4CError("--weights-from-seed needs --random-weights (a checkpoint's weights cannot be regenerated)")
    return {"seed": weights.source.seed, "dtype": weights.source.dtype("")}


def _runtime_libraries(target) -> list[Path]:
    found = {name: find_runtime_library(name) for name in target.bundled_libraries()}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise G4CError(f"--bundle-runtime: {', '.join(missing)} not found (install apache-tvm; CUDA: the toolkit)")
    return list(found.values())


Specs = dict[str, tuple[tuple[int, ...], np.dtype]]


def _weight_specs(lowered, used: list[str], weights: Weights) -> Specs:
    """(shape, storage dtype) of every weight the entry functions take, packed as the kernels want it:
    quantized data and scales as their recipes say, the small weights fp32, matrices in the weight dtype."""
    def dtype(name: str) -> np.dtype:
        quant = lowered.recipes.get(name, {}).get("quant")
        if quant:
            return np.dtype(part_dtype(*quant[2:]))
        return numpy_dtype(lowered.weight_dtype if name in lowered.weight_dtype_tensors else "float32")

    return {name: (derived_shape(name, lowered.recipes, weights.source.shape), dtype(name)) for name in used}


def _maker(recipes: dict, base: Callable[[str], np.ndarray],
           native: Callable[[str], tuple | None] = lambda name: None) -> Callable[[str], np.ndarray]:
    """`derived_weight` for the writer, with the quantization of a matrix done once for its data and
    its scales (written one after the other). Checkpoint tensors stored quantized in the same scheme
    (`native(name)` → (scheme, data, scales), e.g. a GGUF file's Q4_0 blocks) are used as they are,
    packed and sliced by rows, never requantized."""
    from g4c.quant import as_words, part_dtype, quantize

    def blocks(name: str, scheme: str) -> tuple[np.ndarray, np.ndarray]:  # (data bytes, fp32 scales)
        recipe = recipes.get(name)
        if recipe is None and (stored := native(name)) is not None and stored[0] == scheme:
            return as_words(stored[1], "uint8"), stored[2]
        if recipe and "concat" in recipe and recipe["axis"] == 0:  # rows of parts: their blocks stacked
            parts = [blocks(p, scheme) for p in recipe["concat"]]
            return np.concatenate([d for d, _ in parts]), np.concatenate([s for _, s in parts])
        if recipe and "rows" in recipe:
            source, lo, hi = recipe["rows"]
            data, scales = blocks(source, scheme)
            return data[lo:hi], scales[lo:hi]
        return quantize(derived_weight(name, recipes, base), scheme, "uint8")

    @functools.lru_cache(maxsize=1)
    def quantized(source: str, scheme: str) -> tuple[np.ndarray, np.ndarray]:
        return blocks(source, scheme)

    def make(name: str) -> np.ndarray:
        quant = recipes.get(name, {}).get("quant")
        if quant:  # the data in its word; the scales in fp32 (the writer converts them to their dtype)
            source, scheme, part, *stored = quant
            data, scales = quantized(source, scheme)
            return as_words(data, part_dtype(part, *stored)) if part == "data" else scales
        return derived_weight(name, recipes, base)
    return make


def _source_f32(weights: Weights) -> Callable[[str], np.ndarray]:
    """fp32 checkpoint tensors, checked for NaN/Inf as they are read and not kept (Weights.f32 caches
    every tensor it returns); the last one is kept for the row slices of a split table, which follow
    one another."""
    @functools.lru_cache(maxsize=1)
    def get(name: str) -> np.ndarray:
        return check_finite(name, np.asarray(weights.source.get(name), dtype=np.float32))
    return get


def check_finite(name: str, array: np.ndarray, converted_from: np.ndarray | None = None) -> np.ndarray:
    """`array`, after checking it holds no NaN or Inf: such weights compile but every logit becomes NaN
    (greedy decoding then prints token 0 forever). min and max propagate both, so the check allocates
    nothing (peak memory stays one tensor). `converted_from`: the finite array `array` was converted
    from, so that a non-finite value means the storage dtype overflowed."""
    if array.size == 0:
        return array
    low, high = array.min(), array.max()
    if np.isfinite(low) and np.isfinite(high):
        return array
    if converted_from is not None:
        dtype = dtype_name(array.dtype)
        raise WeightError(f"tensor {name} overflows {dtype} (its largest magnitude is "
                          f"{float(np.max(np.abs([converted_from.min(), converted_from.max()]))):.4g}): "
                          f"compile with a wider --dtype (bf16 or fp32)")
    kind = "NaN" if np.isnan(low) or np.isnan(high) else "infinite"
    raise WeightError(f"tensor {name} has {kind} values: the weights are corrupt (every logit would be NaN)")


def _write_weights(directory: Path, lowered, specs: Specs, weights: Weights, report: Progress) -> None:
    """weights.safetensors, packed and converted one tensor at a time (peak memory: the largest one),
    each checked for NaN/Inf: checkpoint tensors as they are read (the message names the checkpoint's
    tensor), packed tensors after the conversion to their storage dtype (fp16 overflows)."""
    base = _source_f32(weights)
    make = _maker(lowered.recipes, base, getattr(weights.source, "quantized", lambda name: None))

    def produce(name: str) -> np.ndarray:
        packed = make(name)
        with np.errstate(over="ignore"):  # an overflow is reported by check_finite, not as a warning
            stored = packed.astype(specs[name][1], copy=False)
        if stored is packed:
            return stored
        try:
            check_finite(name, stored, converted_from=packed)
        except WeightError:
            del packed, stored
            for part in source_tensors(name, lowered.recipes):  # name the checkpoint tensor, not the packed one
                with np.errstate(over="ignore"):
                    check_finite(part, base(part).astype(specs[name][1]), converted_from=base(part))
            raise
        if "quant" in lowered.recipes.get(name, {}) and not np.array_equal(stored, packed):
            raise WeightError(f"tensor {name}: quantization scales not representable in {dtype_name(stored.dtype)} "
                              "(a checkpoint's scales are kept exactly or not at all)")
        return stored

    write_safetensors(directory / WEIGHTS, specs, produce, lambda done, total: report("writing weights", done, total))


def _write_host_tables(directory: Path, lowered, weights: Weights) -> None:
    """host.safetensors (the PLE table), each table checked for NaN/Inf as it is converted and written.
    --weights-from-seed compiles write neither file and need no check: their weights are seeded
    random numbers (`RandomWeights`: bounded, finite in every dtype), regenerated by the runtime."""
    if not lowered.host_tables:
        return
    if lowered.host_quant:  # data and scales per table, made from the fp32 table (checked first)
        recipes = {}
        for table in lowered.host_tables:
            for kind, suffix in (("data", ""), ("scales", "_scales")):
                recipes[f"{table}.{lowered.host_quant}{suffix}"] = {
                    "quant": [table, lowered.host_quant, kind, "uint32" if kind == "data" else "float16"]}
        make = _maker(recipes, lambda name: check_finite(name, np.asarray(weights.source.get(name), np.float32)),
                      getattr(weights.source, "quantized", lambda name: None))  # a GGUF's Q4_0 table as stored
        specs = {name: (derived_shape(name, recipes, weights.source.shape), np.dtype(part_dtype(*recipe["quant"][2:])))
                 for name, recipe in recipes.items()}
        write_safetensors(directory / HOST, specs, make)
        return
    host_dtype = numpy_dtype(lowered.weight_dtype)

    def produce(name: str) -> np.ndarray:
        source = check_finite(name, np.asarray(weights.source.get(name)))
        with np.errstate(over="ignore"):
            stored = source.astype(host_dtype, copy=False)
        return stored if stored is source else check_finite(name, stored, converted_from=source)

    specs = {n: (weights.source.shape(n), host_dtype) for n in lowered.host_tables}
    write_safetensors(directory / HOST, specs, produce)
