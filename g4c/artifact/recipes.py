"""Weight recipes: how an artifact's derived weights are made from the checkpoint's tensors.

The lowering records a recipe for every weight that is not a checkpoint tensor as it is (packed
q/k/v and gate/up, RoPE tables, row slices of a table split for a GPU binding, constants); the
compiler writes them with these functions, and a `--weights-from-seed` artifact is regenerated with
the same functions at load time, so both produce identical bytes. numpy only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from g4c.artifact.tensors import ArtifactError


def derived_weight(name: str, recipes: dict[str, dict], base: Callable[[str], np.ndarray]) -> np.ndarray:
    """A weight as the kernels take it: `base(name)` (a checkpoint tensor, fp32), or made by its recipe
    from the lowering — {"concat": parts, "axis": k} (packed q/k/v, gate/up), {"rope": [type, theta,
    partial, head_dim]} (inverse frequencies), {"rows": [source, lo, hi]} (a slice of a table split
    for a GPU binding), {"select": [source, axis, index]} (one entry of a stacked table), {"const": value}, {"quant": [source, scheme, "data" | "scales", dtype]} (a
    group-quantized weight, `g4c.quant`; dtype: the data's word, uint32 by default, or the scales' float
    dtype, float32 by default). Compile time and seeded load time share it."""
    from g4c.config import RopeSpec

    recipe = recipes.get(name)
    if recipe is None:
        return base(name)
    if "concat" in recipe:
        return np.concatenate([derived_weight(p, recipes, base) for p in recipe["concat"]], axis=recipe["axis"])
    if "rope" in recipe:
        rope_type, theta, partial, head_dim = recipe["rope"]
        return RopeSpec(rope_type, theta, partial).inv_freq(head_dim)
    if "rows" in recipe:
        source, lo, hi = recipe["rows"]
        return derived_weight(source, recipes, base)[lo:hi]
    if "select" in recipe:
        source, axis, index = recipe["select"]
        return np.ascontiguousarray(np.take(derived_weight(source, recipes, base), index, axis=axis))
    if "const" in recipe:
        return np.array([recipe["const"]], np.float32)
    if "quant" in recipe:  # [source, scheme, "data" | "scales"(, storage dtype)]: g4c.quant's layout
        from g4c.quant import as_words, part_dtype, quantize

        source, scheme, part, *stored = recipe["quant"]
        data, scales = quantize(derived_weight(source, recipes, base), scheme, "uint8")
        dtype = part_dtype(part, *stored)
        return as_words(data, dtype) if part == "data" else scales.astype(dtype)
    raise ArtifactError(f"unknown recipe for weight {name}: {recipe}")


def source_tensors(name: str, recipes: dict[str, dict]) -> list[str]:
    """The checkpoint tensors a derived weight is made of (itself when it has no recipe; none for
    tables made from nothing, such as RoPE frequencies and constants)."""
    recipe = recipes.get(name)
    if recipe is None:
        return [name]
    if "concat" in recipe:
        return [leaf for part in recipe["concat"] for leaf in source_tensors(part, recipes)]
    if "rows" in recipe:
        return source_tensors(recipe["rows"][0], recipes)
    if "select" in recipe:
        return source_tensors(recipe["select"][0], recipes)
    if "quant" in recipe:
        return source_tensors(recipe["quant"][0], recipes)
    return []


def derived_shape(name: str, recipes: dict[str, dict], base: Callable[[str], tuple[int, ...]]) -> tuple[int, ...]:
    """The shape `derived_weight` would produce, without making the array."""
    recipe = recipes.get(name)
    if recipe is None:
        return tuple(base(name))
    if "concat" in recipe:
        parts = [derived_shape(p, recipes, base) for p in recipe["concat"]]
        axis = recipe["axis"] % len(parts[0])
        return tuple(sum(p[axis] for p in parts) if i == axis else d for i, d in enumerate(parts[0]))
    if "rope" in recipe:
        return (recipe["rope"][3] // 2,)
    if "rows" in recipe:
        source, lo, hi = recipe["rows"]
        return (hi - lo, *derived_shape(source, recipes, base)[1:])
    if "select" in recipe:
        source, axis, _ = recipe["select"]
        shape = derived_shape(source, recipes, base)
        return shape[:axis] + shape[axis + 1:]
    if "quant" in recipe:
        from g4c.quant import packed_shapes, part_dtype

        source, scheme, part, *stored = recipe["quant"]
        word = part_dtype(part, *stored) if part == "data" else "uint32"  # the scales' shape has no word
        return packed_shapes(derived_shape(source, recipes, base), scheme, word)[part == "scales"]
    return (1,)
