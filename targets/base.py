"""The Target abstraction: a name, the `tvm.target.Target`, default schedules and build options."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from g4c.errors import G4CError


@dataclass
class Target:
    name: str
    tvm_target: Callable[[], object]  # built lazily: creating targets needs the compiler
    schedule: Callable[[str, object], object]  # (kernel name, PrimFunc) → scheduled IRModule/PrimFunc
    library_suffix: str = ".so"
    options: dict = field(default_factory=dict)
    export: Callable[[object, str], None] | None = None  # (built library, path); default export_library
    runtime: str = "relax-vm"  # what executes the artifact: the Relax VM (g4c.runtime.artifact) or "wgpu"
    gpu: bool = False  # GPU kernels (int32 indices, g4c.codegen.gpu_kernels)
    device: str = "cpu"  # where the Relax VM runs the kernels: "cpu", "cuda" or "metal"
    relax_pipeline: Callable[[], object] | None = None  # Relax lowering; None: TVM's "default" for the target
    library: str = "kernels.so"  # the library the runtime loads (metal: kernels.dylib, linked on the Mac)
    static_decode: bool = False  # decode takes fixed tensors (one token, whole caches): CUDA graphs replay it

    def export_library(self, lib, path: str) -> None:
        if self.export is not None:
            self.export(lib, path)
        else:
            lib.export_library(path)

    @property
    def runs_here(self) -> bool:
        """Whether artifacts for this target execute on this machine (the host CPU)."""
        return self.name == "llvm" or self.runtime == "wgpu"  # wgpu finds a Vulkan device or says why not


def module_tree(mod):
    """A built TVM module and everything it imports (host module, CUDA/Metal device modules)."""
    yield mod
    for child in mod.imports:
        yield from module_tree(child)


TARGETS = ("llvm", "arm", "arm:<profile>", "vulkan", "vulkan:<profile>", "cuda", "cuda:<arch>", "metal",
           "metal:<profile>")


def get_target(name: str) -> Target:
    """`llvm` (this CPU), `arm` (= arm:cortex-a76) or `arm:<profile>` (see targets/arm.py), `vulkan`
    (= vulkan:generic) or `vulkan:<profile>` (see targets/vulkan.py), `cuda` (= cuda:sm_90) or
    `cuda:<arch>` (see targets/cuda.py), `metal` (= metal:apple-m1) or `metal:<profile>` (targets/metal.py)."""
    from g4c.targets.arm import arm_target
    from g4c.targets.cuda import cuda_target
    from g4c.targets.llvm import host_target
    from g4c.targets.metal import metal_target
    from g4c.targets.vulkan import vulkan_target

    kind, _, profile = name.partition(":")
    if kind == "llvm" and not profile:
        return host_target()
    if kind == "arm":
        return arm_target(profile) if profile else arm_target()
    if kind == "vulkan":
        return vulkan_target(profile) if profile else vulkan_target()
    if kind == "cuda":
        return cuda_target(profile) if profile else cuda_target()
    if kind == "metal":
        return metal_target(profile) if profile else metal_target()
    raise G4CError(f"unknown target {name!r}: available targets are {', '.join(TARGETS)}")
