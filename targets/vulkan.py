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
from dataclasses import asdict, dataclass

from g4c.errors import G4CError
from g4c.targets.base import Target


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


def gpu_schedule(tvm_target, matmul: bool = True):
    """(kernel name, PrimFunc) → PrimFunc scheduled for a GPU: hand-written GPU kernels are kept,
    everything else goes through dlight's GEMV/GEMM/reduction/fallback rules (`matmul=False` leaves
    GEMMs to the fallback rule)."""
    def schedule(name: str, func):
        import tvm
        from tvm.s_tir import dlight as dl

        if func.attrs is not None and "tirx.is_scheduled" in func.attrs:
            return func
        rules = [dl.gpu.GEMV()] + ([dl.gpu.Matmul()] if matmul else [])
        rules += [dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
        with tvm_target:
            mod = dl.ApplyDefaultSchedule(*rules)(tvm.IRModule({name: func}))
        return mod[name]
    return schedule


def vulkan_target(profile: str = DEFAULT_PROFILE) -> Target:
    if profile not in PROFILES:
        raise G4CError(f"unknown Vulkan profile {profile!r}: available profiles are {', '.join(PROFILES)}")
    spec = PROFILES[profile]
    @functools.cache  # made once, when first needed: creating it needs the compiler
    def tvm_target():
        import tvm

        from g4c.targets.llvm import _tvm_target as host

        return tvm.target.Target({"kind": "webgpu", "max_num_threads": spec.threads}, host=host())

    def schedule(name: str, func):
        return gpu_schedule(tvm_target())(name, func)

    return Target(f"vulkan:{profile}", tvm_target, schedule, library_suffix=".wgsl",
                  options={"profile": profile, **asdict(spec)}, runtime="wgpu", gpu=True)
