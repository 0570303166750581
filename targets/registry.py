"""The target registry: every module of `g4c.targets` that defines a module-level `KIND`
(a `TargetKind`) is a target; adding a target is adding such a module (plus its tests).

`get_target("kind:profile")` makes one; `target_kinds()` lists them for the CLI's help and errors.
Target modules import TVM only inside their methods, so listing them is cheap.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from g4c.errors import G4CError


@dataclass(frozen=True)
class TargetKind:
    kind: str  # "llvm", "arm", ...
    make: Callable[[str], object]  # profile → Target
    summary: str  # one line for --help
    profiles: tuple[str, ...] = ()  # accepted after "kind:" (empty: no profiles)
    default: str = ""  # the profile of a bare "kind"
    profile_option: str | None = None  # a CLI option that also names the profile (e.g. "arch")
    order: int = 100  # position in listings
    host: bool = False  # the CPU of the machine g4c runs on
    title: str = ""  # how messages name the kind ("CUDA")

    def help(self) -> str:
        if not self.profiles:
            return f"{self.kind} ({self.summary})"
        return f"{self.kind} or {self.kind}:<{self.profile_option or 'profile'}> ({', '.join(self.profiles)}; " \
               f"default {self.default}; {self.summary})"


@functools.cache
def target_kinds() -> dict[str, TargetKind]:
    import g4c.targets as package

    kinds = []
    for module in pkgutil.iter_modules(package.__path__):
        kind = getattr(importlib.import_module(f"g4c.targets.{module.name}"), "KIND", None)
        if isinstance(kind, TargetKind):
            kinds.append(kind)
    return {k.kind: k for k in sorted(kinds, key=lambda k: (k.order, k.kind))}


def host_target():
    """The target of this machine's CPU (what `g4c bench` measures its bandwidth kernel with)."""
    return get_target(next(k.kind for k in target_kinds().values() if k.host))


def target_names() -> list[str]:
    return [k.kind + (f", {k.kind}:<{k.profile_option or 'profile'}>" if k.profiles else "")
            for k in target_kinds().values()]


def get_target(name: str):
    """`kind` (its default profile) or `kind:profile`; unknown names are one clear error."""
    kind, _, profile = name.partition(":")
    spec = target_kinds().get(kind)
    if spec is None or (profile and not spec.profiles):
        raise G4CError(f"unknown target {name!r}: available targets are {', '.join(target_names())}")
    profile = profile or spec.default
    if spec.profiles and profile not in spec.profiles:
        what = spec.profile_option or "profile"
        raise G4CError(f"unknown {spec.title or spec.kind} {what} {profile!r}: available {what}s are "
                       f"{', '.join(spec.profiles)}")
    return spec.make(profile)


def with_profile_option(target: str, option: str, value: str | None) -> str:
    """`--arch sm_80` style options: the target name with that profile (`cuda:sm_80`)."""
    if value is None:
        return target
    kinds = [k for k in target_kinds().values() if k.profile_option == option]
    kind = target.partition(":")[0]
    match = next((k for k in kinds if k.kind == kind), None)
    default = target_kinds().get(target)
    if match is None and len(kinds) == 1 and default is not None and default.host:  # the CLI's default target
        match = kinds[0]
    if match is None:
        raise G4CError(f"--{option} applies to --target {' or '.join(k.kind for k in kinds)}, not {target}")
    return f"{match.kind}:{value}"
