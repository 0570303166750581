"""ARM CPU targets (`arm`, `arm:<profile>`): TVM's LLVM AArch64 codegen with the host CPU schedules
(16-lane partial sums are four NEON registers), linked by the aarch64 cross gcc.

Profiles name the core the artifact is tuned for: its LLVM `mcpu` and the extensions the kernels may
use. An artifact built for a profile runs on that core and on newer ones; `QEMU_CPU=<core>` under
qemu-aarch64 faults on instructions the core lacks, as the board would.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

from g4c.codegen.spec import KernelSpec
from g4c.errors import G4CError
from g4c.targets.base import RelaxVMTarget, Requirements
from g4c.targets.llvm import cpu_builders, schedule_cpu
from g4c.targets.registry import TargetKind

CROSS_COMPILER = "aarch64-linux-gnu-gcc"
TRIPLE = "aarch64-linux-gnu"

# mcpu, mattr, cores of a typical device
PROFILES: dict[str, tuple[str, list[str], int]] = {
    "cortex-a76": ("cortex-a76", ["+neon", "+dotprod", "+fullfp16"], 4),  # Raspberry Pi 5
    "cortex-a78": ("cortex-a78", ["+neon", "+dotprod", "+fullfp16"], 4),  # phone big cores (2020-22)
    "cortex-x1": ("cortex-x1", ["+neon", "+dotprod", "+fullfp16"], 1),  # phone prime core
    "cortex-a710": ("cortex-a710", ["+neon", "+dotprod", "+fullfp16", "+i8mm", "+bf16"], 4),  # Armv9 phones
    "cortex-a55": ("cortex-a55", ["+neon", "+dotprod", "+fullfp16"], 4),  # phone little cores
}
DEFAULT_PROFILE = "cortex-a76"


class ArmTarget(RelaxVMTarget):
    """`arm:<profile>`: an AArch64 core, cross-compiled and cross-linked."""

    def __init__(self, profile: str = DEFAULT_PROFILE):
        self.profile = profile
        self.name = f"arm:{profile}"

    def builders(self) -> dict:
        return cpu_builders()

    def schedule(self, spec: KernelSpec, func):
        return schedule_cpu(spec, func)

    @functools.cache
    def tvm_target(self):
        import tvm

        mcpu, mattr, cores = PROFILES[self.profile]
        return tvm.target.Target({"kind": "llvm", "mtriple": TRIPLE, "mcpu": mcpu, "mattr": mattr,
                                  "num-cores": cores})

    def export(self, lib, directory: Path) -> None:
        if shutil.which(CROSS_COMPILER) is None:
            raise G4CError(f"--target arm links with {CROSS_COMPILER}: install it (Debian: "
                           "apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross)")
        from tvm.support import cc

        lib.export_library(str(directory / self.requirements().library),
                           fcompile=cc.cross_compiler(CROSS_COMPILER))

    def requirements(self) -> Requirements:
        return Requirements(machines=("aarch64", "arm64"))


KIND = TargetKind("arm", ArmTarget, "AArch64 cores, cross-compiled", tuple(PROFILES), DEFAULT_PROFILE, order=1,
                  title="ARM")
