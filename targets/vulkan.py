"""Vulkan GPU targets (`vulkan`, `vulkan:<profile>`): phones (Adreno, Mali) and desktop GPUs.

TVM has no SPIR-V backend in the wheel, so kernels go through its WebGPU codegen: WGSL, which
wgpu-native (the g4c wgpu runtime; the same library ships for Android) compiles to SPIR-V for the
Vulkan driver. Schedules: the GPU kernels of `g4c.codegen.gpu_kernels` as written, dlight rules
(GEMV, GEMM, reductions, elementwise) for the rest.

Profiles set what the device allows: threads per workgroup, whether fp16 weights may be used
(`shader-f16`: Float16 + 16-bit storage access), and the largest tensor one storage binding may hold
(lavapipe and the WebGPU default: 128 MiB; Adreno 7xx and Mali-G7xx Vulkan drivers report 1 GiB or
more, which wgpu caps at its 2 GiB buffer limit).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from g4c.artifact import SHADERS
from g4c.errors import G4CError
from g4c.targets.base import Built, Requirements, Toolchain
from g4c.targets.gpu import WEBGPU_SHARED_MEMORY, GpuTarget, gpu_lowering
from g4c.targets.llvm import host_tvm_target
from g4c.targets.registry import TargetKind


@dataclass(frozen=True)
class VulkanProfile:
    threads: int  # max threads per workgroup the schedules may use
    fp16: bool  # fp16 weight storage allowed (shader-f16)
    max_binding: int  # bytes one storage binding may span


PROFILES = {
    "generic": VulkanProfile(threads=256, fp16=False, max_binding=128 << 20),
    "adreno-7xx": VulkanProfile(threads=256, fp16=True, max_binding=1 << 30),
    "mali-g7xx": VulkanProfile(threads=256, fp16=True, max_binding=1 << 30),
}
DEFAULT_PROFILE = "generic"


class VulkanTarget(GpuTarget):
    """`vulkan:<profile>`: WGSL kernels with launch records, run by the wgpu executor."""

    runtime = "wgpu"
    static_decode = False  # wgpu records each step's launches itself

    def __init__(self, profile: str = DEFAULT_PROFILE):
        self.profile, self.spec = profile, PROFILES[profile]
        self.name = f"vulkan:{profile}"
        self.lowering = gpu_lowering(WEBGPU_SHARED_MEMORY, max_binding=self.spec.max_binding)

    @functools.cache
    def tvm_target(self):
        import tvm

        return tvm.target.Target({"kind": "webgpu", "max_num_threads": self.spec.threads}, host=host_tvm_target())

    def check_weights(self, weight_dtype: str, sizes: dict[str, int]) -> None:
        """WGSL has no bf16 and no 16-bit integers; fp16 needs a profile with shader-f16; every tensor
        must fit one storage binding."""
        if weight_dtype == "bfloat16":
            raise G4CError(f"--target {self.name} cannot store bf16 weights (WGSL has no bf16): use "
                           "--dtype float16 or float32")
        if weight_dtype == "float16" and not self.spec.fp16:
            raise G4CError(f"Vulkan profile {self.profile} has no fp16 (shader-f16): use --dtype float32 "
                           "or a profile with fp16 (vulkan:adreno-7xx, vulkan:mali-g7xx)")
        for name, size in sizes.items():
            if size > self.spec.max_binding:
                raise G4CError(f"weight {name} ({size} bytes) exceeds the {self.spec.max_binding}-byte storage "
                               f"binding of Vulkan profile {self.profile}")

    def build(self, lowered, entry, kernels: dict[str, object], storage: dict, static_decode: bool) -> Built:
        from g4c.codegen import wgsl

        shaders, launches = wgsl.build(kernels, self.tvm_target())
        return Built(lambda directory: (directory / SHADERS).write_text(shaders),
                     {"launches": {k: [x.to_json() for x in v] for k, v in launches.items()}})

    def requirements(self) -> Requirements:
        return Requirements(library=SHADERS, device="vulkan", device_type=7, runtime_libraries=())

    @property
    def runs_here(self) -> bool:
        return True  # wgpu finds a Vulkan device or says why not

    def embed_toolchain(self) -> Toolchain:
        """The C runtime drives wgpu-native's C API (webgpu.h, wgpu.h); the wgpu wheel ships the headers
        and libwgpu_native for this machine (Android/iOS builds of wgpu-native take the same sources)."""
        from pathlib import Path

        try:
            import wgpu
        except ImportError:
            raise G4CError("the C runtime of Vulkan artifacts links wgpu-native: pip install 'g4c[vulkan]', or "
                           "compile with --no-embed") from None
        resources = Path(wgpu.__file__).parent / "resources"
        native = next(iter(sorted(resources.glob("libwgpu_native*.so"))), None)
        if native is None:
            raise G4CError(f"no libwgpu_native*.so in {resources}: reinstall wgpu, or compile with --no-embed")
        return Toolchain("g++", "wgpu", (resources,), (native,))


KIND = TargetKind("vulkan", VulkanTarget, "WGSL run through wgpu", tuple(PROFILES), DEFAULT_PROFILE, order=2,
                  title="Vulkan")
