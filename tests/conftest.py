"""Shared fixtures: tiny random checkpoints written by transformers, loaded through g4c."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hf_reference import FAMILIES, UNIFIED, hf_config, load_reference, make_checkpoint  # noqa: E402

# Prompts longer than every family's sliding window (4..6).
PROMPT = [2, 17, 99, 5, 8, 1, 44, 23, 60, 7, 9, 31, 12, 250, 3, 77, 101, 18, 64, 200]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """family name → checkpoint directory (e, moe, dense, unified)."""
    root = tmp_path_factory.mktemp("ckpt")
    dirs = {name: make_checkpoint(root / name, hf_config(kwargs), seed=i + 1)
            for i, (name, kwargs) in enumerate(FAMILIES.items())}
    dirs["unified"] = make_checkpoint(root / "unified", hf_config(UNIFIED, unified=True), seed=11)
    return dirs


@pytest.fixture(scope="session")
def references(checkpoints):
    return {name: load_reference(path) for name, path in checkpoints.items()}


@pytest.fixture(scope="session")
def artifacts(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """Each test checkpoint compiled for the host (`llvm`)."""
    return compile_families(checkpoints, ("e", "moe", "dense", "unified"), "llvm",
                            tmp_path_factory.mktemp("artifacts"))


def compile_families(checkpoints, families, target: str, root: Path, **options) -> dict[str, Path]:
    """family → the test checkpoint compiled for `target` under `root` (compile_model options pass through)."""
    from g4c.compiler import compile_model
    from g4c.model import load_model

    out = {}
    for family in families:
        loaded = load_model(str(checkpoints[family]))
        out[family] = compile_model(loaded.cfg, loaded.weights, target, root / family, **options)
    return out
