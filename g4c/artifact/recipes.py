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
    dtype, float32 by default), {"softplus": source} (log(1 + eˣ) of a weight in fp32: the audio tower's
    per-dim query scale), {"rel_positions": [count, dim]} (the audio tower's relative-position sinusoids,
    the IR op `rel_positions`), {"reshape": [source, shape]} (a weight with a new shape, e.g. a 0-d
    checkpoint scalar as [1]: artifacts hold no 0-d tensors). Compile time and seeded load time share it."""
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
    if "softplus" in recipe:  # as the interpreter's `softplus`: fp32, no overflow
        return np.logaddexp(np.float32(0.0), np.asarray(derived_weight(recipe["softplus"], recipes, base), np.float32))
    if "rel_positions" in recipe:
        return rel_positions(*recipe["rel_positions"])
    if "reshape" in recipe:
        source, shape = recipe["reshape"]
        return np.reshape(derived_weight(source, recipes, base), tuple(shape))
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
    if "softplus" in recipe:
        return source_tensors(recipe["softplus"], recipes)
    if "reshape" in recipe:
        return source_tensors(recipe["reshape"][0], recipes)
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
    if "softplus" in recipe:
        return derived_shape(recipe["softplus"], recipes, base)
    if "rel_positions" in recipe:
        return tuple(recipe["rel_positions"])
    if "reshape" in recipe:
        return tuple(recipe["reshape"][1])
    return (1,)


def rel_positions(count: int, dim: int) -> np.ndarray:
    """[count, dim] sinusoids of the distances count-1 … 0, `[sin(p·f), cos(p·f)]` with fp32 timescales
    f_i = exp(-i·ln(1e4) / max(dim/2 - 1, 1)) (transformers' `Gemma4AudioRelPositionalEncoding`; the IR op
    `rel_positions`, which the interpreter computes the same way)."""
    half = dim // 2
    inv = np.exp(np.arange(half, dtype=np.float32) * np.float32(-np.log(1e4) / max(half - 1, 1)))
    angle = np.arange(count - 1, -1, -1, dtype=np.float64)[:, None] * inv.astype(np.float64)
    return np.concatenate([np.sin(angle), np.cos(angle)], axis=-1).astype(np.float32)
