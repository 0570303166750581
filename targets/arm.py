"""ARM CPU targets (`arm`, `arm:<profile>`): TVM's LLVM AArch64 codegen with the host CPU schedules
(16-lane partial sums are four NEON registers), linked by the aarch64 cross gcc.

Profiles name the core the artifact is tuned for: its LLVM `mcpu` and the extensions the kernels may
use. An artifact built for a profile runs on that core and on newer ones; `QEMU_CPU=<core>` under
qemu-aarch64 faults on instructions the core lacks, as the board would.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from g4c.codegen.spec import KernelSpec
from g4c.errors import G4CError
from g4c.targets.base import RelaxVMTarget, Requirements, Toolchain, vm_toolchain
from g4c.targets.llvm import cpu_builders, cpu_knob_space, schedule_cpu
from g4c.targets.registry import TargetKind

CROSS_COMPILER = "aarch64-linux-gnu-gcc"
CROSS_CXX = "aarch64-linux-gnu-g++"
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
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

    def schedule(self, spec: KernelSpec, func, knobs: dict | None = None):
        return schedule_cpu(spec, func, knobs)

    def knob_space(self, spec: KernelSpec) -> dict[str, list[int]]:
        return cpu_knob_space(spec)

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

    def embed_toolchain(self) -> Toolchain:
        if shutil.which(CROSS_CXX) is None:
            raise G4CError(f"the C runtime of --target arm is built with {CROSS_CXX}: install it (Debian: apt-get "
                           "install g++-aarch64-linux-gnu), or compile with --no-embed")
        ffi, runtime = aarch64_runtime_libraries()
        return vm_toolchain(CROSS_CXX, [runtime], ffi_library=ffi)


def aarch64_runtime_libraries() -> tuple[Path, Path]:
    """(libtvm_ffi.so, libtvm_runtime.so) built for aarch64 Linux, which the C runtime links and ships: from
    the emulated environment of scripts/arm-emu.sh when it exists, else taken out of the aarch64 wheels of
    the installed apache-tvm-ffi / apache-tvm versions (downloaded once under $G4C_CACHE/arm/runtime)."""
    cache = Path(os.environ.get("G4C_CACHE", Path.home() / ".cache" / "g4c")) / "arm"
    site = cache / "site"
    if (site / ".complete").is_file():
        return site / "tvm_ffi" / "lib" / "libtvm_ffi.so", site / ".lib" / "libtvm_runtime.so"
    out = cache / "runtime"
    ffi, runtime = out / "libtvm_ffi.so", out / "libtvm_runtime.so"
    if ffi.is_file() and runtime.is_file():
        return ffi, runtime
    from importlib.metadata import version

    wheels = out / "wheels"
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", *platforms,
               "--python-version", "3.11", "-d", str(wheels), f"apache-tvm-ffi=={version('apache-tvm-ffi')}",
               f"apache-tvm=={version('apache-tvm')}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise G4CError("cannot download the aarch64 TVM runtime wheels for the C runtime: "
                       f"{(done.stderr.strip().splitlines() or ['pip failed'])[-1]} (or compile with --no-embed)")
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if member.endswith(("lib/libtvm_ffi.so", "lib/libtvm_runtime.so")):
                    target = out / Path(member).name
                    target.write_bytes(archive.read(member))
    shutil.rmtree(wheels, ignore_errors=True)
    if not (ffi.is_file() and runtime.is_file()):
        raise G4CError("the aarch64 TVM wheels lack libtvm_ffi.so or libtvm_runtime.so")
    return ffi, runtime


KIND = TargetKind("arm", ArmTarget, "AArch64 cores, cross-compiled", tuple(PROFILES), DEFAULT_PROFILE, order=1,
                  title="ARM")
