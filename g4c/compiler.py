"""Compile a model into an artifact directory: kernels library, packed weights, manifest.

    DIR/kernels.so              the Relax VM executable (`prefill`, `prefill_all`, `decode` entry functions) and
                                every TensorIR kernel, built by TVM for the target (`export_library`; CUDA:
                                with an nvcc fatbin; Metal: kernels.tar + kernels.metal + link.sh instead;
                                Vulkan: kernels.wgsl, with launch records in the manifest, and no VM)
    DIR/weights.safetensors     fp32 weights as the kernels want them (q/k/v and gate/up packed, RoPE tables)
    DIR/host.safetensors        tables kept in host memory and gathered row by row (the PLE table)
    DIR/manifest.json           config, target, programs (kernel call sequences), KV slots and plan,
                                dtype, weight recipes, g4c/TVM versions, SHA-256 of every file
    DIR/lib*.so*                with --bundle-runtime: the TVM runtime libraries the target needs
    (--weights-from-seed: no weights/host files; the runtime regenerates them from the seed)

The directory is written under a temporary name and renamed when complete: a failed compile leaves
nothing behind.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

import g4c
from g4c.atomic import atomic_directory, check_writable
from g4c.config import ModelConfig
from g4c.dtypes import canonical_dtype, dtype_name, numpy_dtype
from g4c.frontend import build_graph
from g4c.errors import G4CError
from g4c.passes import DEFAULT_PIPELINE, PassContext, PassManager
from g4c.runtime.artifact import (FORMAT, FORMAT_VERSION, HOST, LIBRARY, MANIFEST, WEIGHTS, sha256_file,
                                  tensor_bytes, write_safetensors)
from g4c.runtime.wgpu_session import SHADERS
from g4c.weights import Weights, derived_shape, derived_weight
PROGRAMS = {"prefill": ("prefill", 1), "prefill_all": ("prefill", None), "decode": ("decode", None)}

Progress = Callable[[str, int, int], None]


def optimized_graphs(cfg: ModelConfig, weights: Weights) -> dict:
    ctx = PassContext(cfg, weights.f32)
    return {name: PassManager(DEFAULT_PIPELINE).run(build_graph(cfg, mode, keep), ctx)
            for name, (mode, keep) in PROGRAMS.items()}


def compile_model(cfg: ModelConfig, weights: Weights, target_name: str, out_dir: str | Path,
                  overwrite: bool = False, progress: Progress | None = None, dtype: str = "float32",
                  bundle_runtime: bool = False, weights_from_seed: bool = False,
                  static_decode: bool | None = None) -> Path:
    """Lower, schedule, build and write an artifact (see the module docstring). `bundle_runtime` copies
    the TVM runtime libraries the target needs into it; `weights_from_seed` (random weights only)
    writes no weight files: the runtime regenerates them from the seed, so a benchmark artifact of a
    full-size model stays a few MB. `static_decode` (default: the target's choice, on for CUDA and
    Metal) makes `decode` a fixed-shape function the runtime calls with the same tensors every step
    (see `relax_module.build_module`), which CUDA replays as one graph."""
    import tvm

    from g4c.codegen import wgsl
    from g4c.codegen.kernels import STORAGE
    from g4c.codegen.lower import lower
    from g4c.codegen.relax_module import build_module, signature
    from g4c.targets.base import get_target

    target = get_target(target_name)
    static_decode = target.static_decode if static_decode is None else static_decode
    seed = _seed_of(weights) if weights_from_seed else None
    libraries = _runtime_libraries(target) if bundle_runtime else []
    out = Path(out_dir)
    check_writable(out, overwrite)  # before minutes of building
    report = progress or (lambda stage, done, total: None)
    graphs = optimized_graphs(cfg, weights)
    lowered = lower(cfg, graphs, canonical_dtype(dtype), gpu=target.gpu,
                    max_binding=target.options.get("max_binding"),
                    shared_memory=target.options.get("shared_memory", 16384),
                    tiled_gemm=target.options.get("tiled_gemm", False))
    if target.runtime == "wgpu":
        _check_wgpu_dtype(target, lowered.weight_dtype)
    names = sorted(lowered.kernels)
    scheduled = {}
    for i, name in enumerate(names):
        scheduled[name] = target.schedule(name, lowered.kernels[name])
        report("scheduling kernels", i + 1, len(names))
    entry = signature(lowered)
    specs = _weight_specs(lowered, entry.weights, weights)
    report("building library", 0, 1)
    t0 = time.time()
    extra = {}
    if target.runtime == "wgpu":
        _check_bindings(target, specs)
        shaders, launches = wgsl.build(scheduled, target.tvm_target())
        extra = {"runtime": "wgpu", "launches": {k: [x.to_json() for x in v] for k, v in launches.items()}}
    else:
        storage = {name: (shape, STORAGE[dtype_name(dtype)]) for name, (shape, dtype) in specs.items()}
        module, pipeline = build_module(lowered, entry, scheduled, storage, static_decode), "default"
        if target.relax_pipeline:  # run here, so the lowered module can be inspected
            with target.tvm_target():
                module, pipeline = target.relax_pipeline()(module), None
        if target.device == "cuda":
            from g4c.targets.cuda import decode_graph

            extra["decode_graph"] = decode_graph(module)
        lib = tvm.compile(module, target=target.tvm_target(), relax_pipeline=pipeline)
    build_seconds = time.time() - t0
    report("building library", 1, 1)

    with atomic_directory(out, overwrite) as tmp:
        if target.runtime == "wgpu":
            (tmp / SHADERS).write_text(shaders)
        else:
            target.export_library(lib, str(tmp / LIBRARY))
        if seed is None:
            _write_weights(tmp, lowered, specs, weights, report)
            _write_host_tables(tmp, lowered, weights)
        else:
            extra["weights_from_seed"] = seed
        for library in libraries:
            shutil.copy(library, tmp / library.name)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "g4c_version": g4c.__version__,
            "tvm_version": tvm.__version__, "target": target.name, "target_spec": str(target.tvm_target()),
            "device": target.device, "static_decode": static_decode and target.runtime == "relax-vm",
            "index_dtype": lowered.index_dtype, "library": target.library,
            "dtype": "float32", "weight_dtype": lowered.weight_dtype, "half_weights": sorted(lowered.half_weights),
            "weight_recipes": lowered.recipes, "config": cfg.to_hf_dict(), "build_seconds": round(build_seconds, 2),
            "entry": entry.to_json(), "kernels": names,
            "programs": {k: p.to_json() for k, p in lowered.programs.items()},  # kernel sequences, for inspection
            "kv_slots": {k: asdict(v) for k, v in lowered.kv_slots.items()},
            "kv_plan": graphs["decode"].meta.get("kv_plan", []), "host_tables": lowered.host_tables, **extra,
            "files": {f.name: sha256_file(f) for f in sorted(tmp.iterdir())},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def _seed_of(weights: Weights) -> dict:
    from g4c.weights import RandomWeights

    if not isinstance(weights.source, RandomWeights):
        raise G4CError("--weights-from-seed needs --random-weights (a checkpoint's weights cannot be regenerated)")
    return {"seed": weights.source.seed, "dtype": weights.source.dtype("")}


def _runtime_libraries(target) -> list[Path]:
    from g4c.runtime.artifact import RUNTIME_LIBRARIES, find_runtime_library

    if target.runtime != "relax-vm" or target.name.startswith("arm"):
        raise G4CError(f"--bundle-runtime copies this machine's TVM runtime: it applies to llvm and cuda targets, "
                       f"not {target.name}")
    found = {name: find_runtime_library(name) for name in RUNTIME_LIBRARIES[target.device]}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise G4CError(f"--bundle-runtime: {', '.join(missing)} not found (install apache-tvm; CUDA: the toolkit)")
    return list(found.values())


def _check_wgpu_dtype(target, weight_dtype: str) -> None:
    """WGSL has no bf16 and no 16-bit integers; fp16 needs a profile with shader-f16."""
    if weight_dtype == "bfloat16":
        raise G4CError(f"--target {target.name} cannot store bf16 weights (WGSL has no bf16): use "
                       "--dtype float16 or float32")
    if weight_dtype == "float16" and not target.options.get("fp16"):
        raise G4CError(f"Vulkan profile {target.options['profile']} has no fp16 (shader-f16): use --dtype float32 "
                       "or a profile with fp16 (vulkan:adreno-7xx, vulkan:mali-g7xx)")


Specs = dict[str, tuple[tuple[int, ...], np.dtype]]


def _check_bindings(target, specs: Specs) -> None:
    limit = target.options["max_binding"]
    for name, (shape, dtype) in specs.items():
        size = tensor_bytes(shape, dtype)
        if size > limit:
            raise G4CError(f"weight {name} ({size} bytes) exceeds the {limit}-byte storage binding of "
                           f"Vulkan profile {target.options['profile']}")


def _weight_specs(lowered, used: list[str], weights: Weights) -> Specs:
    """(shape, storage dtype) of every weight the entry functions take, packed as the kernels want it."""
    return {name: (derived_shape(name, lowered.recipes, weights.source.shape),
                   numpy_dtype(lowered.weight_dtype if name in lowered.half_weights else "float32"))
            for name in used}


def _source_f32(weights: Weights) -> Callable[[str], np.ndarray]:
    """fp32 checkpoint tensors, not kept (Weights.f32 caches every tensor it returns); the last one is
    kept for the row slices of a split table, which follow one another."""
    @functools.lru_cache(maxsize=1)
    def get(name: str) -> np.ndarray:
        return np.asarray(weights.source.get(name), dtype=np.float32)
    return get


def _write_weights(directory: Path, lowered, specs: Specs, weights: Weights, report: Progress) -> None:
    """weights.safetensors, packed and converted one tensor at a time (peak memory: the largest one)."""
    base = _source_f32(weights)
    write_safetensors(directory / WEIGHTS, specs, lambda name: derived_weight(name, lowered.recipes, base),
                      lambda done, total: report("writing weights", done, total))


def _write_host_tables(directory: Path, lowered, weights: Weights) -> None:
    if lowered.host_tables:
        host_dtype = numpy_dtype(lowered.weight_dtype)
        specs = {n: (weights.source.shape(n), host_dtype) for n in lowered.host_tables}
        write_safetensors(directory / HOST, specs, weights.source.get)
