"""What a target is: one class that owns its slice of the back end.

A `Target` answers, for one device:
- `lowering`: how programs are structured for it (`g4c.codegen.spec.LoweringOptions`);
- `builders()` + `schedule(spec, func)`: which TensorIR builder and which schedule serve each kernel
  spec (`kernel(spec)` combines them);
- `tvm_target()` and `build(...)`: how the kernels and entry functions are compiled and which files
  the artifact gets (library, sources, link scripts);
- `runtime` and `requirements()`: which executor runs its artifacts (the Relax VM or wgpu), on
  which DLPack device, with which runtime libraries, on which machines — written into the manifest,
  so the runtime decides from data and never asks "is this cuda?".

`RelaxVMTarget` is the common case (a Relax VM executable exported with `export_library`); target
modules subclass it and register a `TargetKind` (see `g4c.targets.registry`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from g4c.codegen.spec import KernelSpec, LoweringOptions
from g4c.errors import G4CError


@dataclass
class Built:
    """A compiled library, ready to be written into an artifact directory."""

    write: Callable[[Path], None]  # writes the library files into the (temporary) artifact directory
    manifest: dict = field(default_factory=dict)  # extra manifest fields (launches, decode_graph, ...)


@dataclass(frozen=True)
class Toolchain:
    """How the embeddable C runtime (`g4c.embed`: lib/libg4c.so) is built for a target's artifacts: the
    C++ compiler of the machine that runs them, the executor source it uses, the directories of the
    headers it includes, and the shared libraries it links and ships in lib/ (a device lacks them)."""

    cxx: str  # e.g. "g++", "aarch64-linux-gnu-g++"
    executor: str  # "vm" (TVM's Relax VM through tvm-ffi) or "wgpu" (WGSL through wgpu-native)
    include_dirs: tuple[Path, ...]
    libraries: tuple[Path, ...]  # copied into lib/ and linked, found through the library's $ORIGIN rpath
    loaded: tuple[Path, ...] = ()  # copied into lib/ and loaded when a session opens (a device's runtime:
    # linking it would make every app's link need what it links, e.g. the GPU driver's libcuda)
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Requirements:
    """What the machine that loads an artifact needs (manifest fields of the same names)."""

    library: str = "kernels.so"
    device: str = "cpu"
    device_type: int = 1  # DLPack device type of `device`
    runtime_libraries: tuple[str, ...] = ("libtvm_runtime.so",)
    machines: tuple[str, ...] = ()  # platform.machine() values the code runs on (): this build machine's kind
    system: str | None = None
    platform: str | None = None  # how messages describe where it runs ("macOS, Metal")
    prepare: str | None = None


class Target:
    name: str = ""
    runtime: str = "relax-vm"  # the executor of its artifacts: "relax-vm" or "wgpu"
    lowering: LoweringOptions = LoweringOptions()
    static_decode: bool = False  # decode compiled for fixed tensors (CUDA graphs replay it)
    int8_dot: str | None = None  # the integer dot-product instructions `linear_qdot` uses here, if any

    # -- kernels ---------------------------------------------------------------------------------------
    def builders(self) -> dict[str, Callable]:
        """op → TensorIR builder (keyword arguments: the spec's params and `name`)."""
        raise NotImplementedError

    def schedule(self, spec: KernelSpec, func, knobs: dict | None = None):
        """A scheduled PrimFunc for `spec` (default: as built); `knobs`: parameters from `knob_space`."""
        return func

    def knob_space(self, spec: KernelSpec) -> dict[str, list[int]]:
        """The schedule parameters `g4c tune` may search for `spec` (name → values, the hand schedule's
        first); {}: nothing to tune."""
        return {}

    def unscheduled(self, spec: KernelSpec):
        """The PrimFunc of `spec` as its builder makes it (what tuning records are keyed by)."""
        from g4c.codegen.kernel_math import quant_word
        from g4c.codegen.kernels import index_dtype

        builder = self.builders().get(spec.op)
        if builder is None:
            raise G4CError(f"target {self.name} has no kernel for {spec.op}")
        with index_dtype(self.lowering.index_dtype), quant_word(self.lowering.quant_word, self.lowering.quant_scale):
            return builder(**spec.kwargs, name=spec.name).with_attr("global_symbol", spec.name)

    def kernel(self, spec: KernelSpec, knobs: dict | None = None):
        """The scheduled PrimFunc of `spec` (its symbol is `spec.name`), with tuned `knobs` if given
        (a MetaSchedule record's candidate is its trace: replayed instead of g4c's schedule)."""
        if knobs and "trace" in knobs:
            from g4c.tuning.metaschedule import apply

            return apply(self.unscheduled(spec), knobs["trace"])
        return self.schedule(spec, self.unscheduled(spec), knobs)

    # -- build -----------------------------------------------------------------------------------------
    def tvm_target(self):
        raise NotImplementedError

    def check_weights(self, weight_dtype: str, sizes: dict[str, int]) -> None:
        """Refuse weight storage the device cannot take (dtype, bytes per tensor); default: any."""

    def build(self, lowered, entry, kernels: dict[str, object], storage: dict, static_decode: bool) -> Built:
        raise NotImplementedError

    # -- the machine that runs it ----------------------------------------------------------------------
    def requirements(self) -> Requirements:
        return Requirements()

    @property
    def runs_here(self) -> bool:
        """Whether artifacts for this target execute on this machine."""
        return False

    def embed_toolchain(self) -> Toolchain | None:
        """How lib/libg4c.so is built for this target's artifacts; None: this target has no C runtime yet."""
        return None

    def bundled_libraries(self) -> list[str]:
        """Runtime libraries `--bundle-runtime` copies into the artifact."""
        raise G4CError(f"--bundle-runtime copies this machine's TVM runtime: it does not apply to {self.name}")


def vm_toolchain(cxx: str, runtime_libraries: list[Path], include_dir: Path | None = None,
                 ffi_library: Path | None = None) -> Toolchain:
    """The C runtime of a Relax VM artifact: built on the tvm-ffi C++ API (headers of the installed
    apache-tvm-ffi wheel, the same on every machine), linked with `ffi_library` (libtvm_ffi.so of the
    device's machine; default: this one's) and libtvm_runtime.so; the other runtime libraries (a GPU's
    module loader and its CUDA runtime) are loaded when a session opens, in the manifest's order."""
    from tvm_ffi import libinfo

    include = include_dir or Path(libinfo.find_include_path())
    ffi = ffi_library or Path(libinfo.find_libtvm_ffi())
    linked = [p for p in runtime_libraries if p.name == "libtvm_runtime.so"]
    loaded = [p for p in runtime_libraries if p.name != "libtvm_runtime.so"]
    return Toolchain(cxx, "vm", (include,), (ffi, *linked), tuple(loaded))


def host_runtime_libraries(names) -> list[Path]:
    """This machine's TVM runtime libraries of these names (an installed apache-tvm wheel, CUDA's)."""
    from g4c.artifact.libraries import find_runtime_library

    found = {name: find_runtime_library(name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise G4CError(f"the C runtime links {', '.join(missing)}: not found (install apache-tvm; CUDA: the "
                       "nvidia-cuda-runtime wheel), or compile with --no-embed")
    return list(found.values())


class RelaxVMTarget(Target):
    """Targets whose artifact is a Relax VM executable (`prefill`, `prefill_all`, `decode`)."""

    def relax_pipeline(self):
        """The Relax lowering pipeline; None: TVM's default for the target."""
        return None

    def export(self, lib, directory: Path) -> None:
        lib.export_library(str(directory / self.requirements().library))

    def inspect_module(self, module) -> dict:
        """Extra manifest fields read off the lowered Relax module (default: none)."""
        return {}

    def build(self, lowered, entry, kernels: dict[str, object], storage: dict, static_decode: bool) -> Built:
        import tvm

        from g4c.codegen.relax_module import build_module

        module = build_module(lowered, entry, kernels, storage, static_decode)
        pipeline, extra = self.relax_pipeline(), {}
        if pipeline is not None:  # run here, so the lowered module can be inspected
            with self.tvm_target():
                module = pipeline(module)
            extra = self.inspect_module(module)
        lib = tvm.compile(module, target=self.tvm_target(), relax_pipeline="default" if pipeline is None else None)
        return Built(lambda directory: self.export(lib, directory), extra)


def module_tree(mod):
    """A built TVM module and everything it imports (host module, CUDA/Metal device modules)."""
    yield mod
    for child in mod.imports:
        yield from module_tree(child)

