"""The session core every executor shares: an artifact's set-up, KV plan, PLE rows, chunked prefill,
decode and generation. Executors (`g4c.runtime.relax_vm`, `.wgpu_executor`, `.remote`) only run a
program on buffers.

`Session` is the generation loop (also used by the reference interpreter's session);
`ArtifactSession` is a compiled artifact's session: it reads the manifest, the config and the
weights, sizes the KV caches from the plan (rings of window + chunk − 1 slots for sliding
producers, `max_context` rows for global ones, nothing for KV-sharing layers), gathers the PLE rows
of each chunk from the host table, and hands its executor the inputs and how many rows of each cache
the program needs (rings and static decode: the whole buffer; full caches: the positions so far).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from g4c.artifact import (HOST, MANIFEST, WEIGHTS, ArtifactError, Manifest, aligned, derived_weight,
                          read_aligned_safetensors, read_manifest)
from g4c.config import config_from_dict
from g4c.errors import G4CError
from g4c.runtime.media import MediaSpec, build_prompt, longest_image_block
from g4c.runtime.sampling import Sampler


class Session:
    """Stateful inference over one sequence (its KV cache lives in the backend)."""

    vocab_size: int
    max_context: int
    position: int = 0  # tokens already in the KV cache
    prefill_chunk: int = 64  # compiled backends run a long prompt as chunks of this many tokens
    context_full: bool = False  # the last `generate` stopped because the context reached max_context
    media: MediaSpec | None = None  # a multimodal model's media settings (None: text only)
    hidden_size: int = 0  # the text width: the rows encoders produce

    def prefill(self, tokens: Sequence[int], all_logits: bool = False, images: Sequence = (),
                audio: Sequence = ()) -> np.ndarray:
        """Feed tokens after the cached ones; logits of the last token [vocab] (or [T, vocab]).

        `images` (paths, PIL images, HxWx3 uint8 arrays or `g4c.media.ImageInputs`) and `audio` (WAV
        paths, float waveforms at the model's sampling rate or `g4c.media.AudioInputs`) go with one
        placeholder id each in `tokens` (`g4c.runtime.media`);
        the prompt is then expanded, and `all_logits` has one row per expanded position."""
        if images or audio or self._has_placeholders(tokens):
            return self._prefill_media(tokens, all_logits, images, audio)
        ids = self.check_tokens(tokens)
        outputs = [self._run("prefill_all" if all_logits else "prefill", ids[start: start + self.prefill_chunk])
                   for start in range(0, ids.size, self.prefill_chunk)]
        return np.concatenate(outputs) if all_logits else outputs[-1][-1]

    def _has_placeholders(self, tokens: Sequence[int]) -> bool:
        marks = {self.media.tokens.get("image"), self.media.tokens.get("audio")} - {None} if self.media else set()
        return bool(marks) and any(int(t) in marks for t in tokens)

    def _prefill_media(self, tokens: Sequence[int], all_logits: bool, images: Sequence, audio: Sequence) -> np.ndarray:
        if self.media is None:
            raise G4CError("this model is text-only (its checkpoint has no vision or audio encoder): it takes no "
                           "images or audio")
        encoders = {kind: functools.partial(self.encode, kind) for kind in self.media.towers}
        prompt = build_prompt(self.media, self.check_tokens(tokens), images, audio, encoders, self.hidden_size)
        self.check_tokens(prompt.ids)
        base, outputs = self.position, []
        for start, end in prompt.chunks(self.prefill_chunk):
            arrays = {"ids": prompt.ids[start:end], "soft": prompt.soft[start:end],
                      "soft_mask": prompt.soft_mask[start:end]}
            if self.media.bidirectional_vision:
                arrays["reach"] = prompt.reach[start:end] + base
            outputs.append(self._run_media("prefill_all_media" if all_logits else "prefill_media", arrays))
        return np.concatenate(outputs) if all_logits else outputs[-1][-1]

    def encode(self, kind: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Run the `kind` ("image", "audio") encoder on its inputs: the soft tokens' rows [S, hidden]."""
        raise NotImplementedError

    def _run_media(self, program: str, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Run a media prefill program on one chunk (ids, soft, soft_mask(, reach)); advances the position."""
        raise NotImplementedError

    def decode(self, token: int) -> np.ndarray:
        """Feed one token; its logits [vocab]."""
        return self._run("decode", self.check_tokens([token]))[0]

    def _run(self, program: str, ids: np.ndarray) -> np.ndarray:
        """Compiled backends: run `program` (prefill, prefill_all, decode) on these ids, advance the
        position and return the logits it produces."""
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def check_tokens(self, tokens: Sequence[int]) -> np.ndarray:
        ids = np.asarray(list(tokens), dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise G4CError("need at least one token id")
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise G4CError(f"token id {int(bad[0])} is outside the vocabulary (0..{self.vocab_size - 1})")
        if self.position + ids.size > self.max_context:
            raise G4CError(f"context of {self.position + ids.size} tokens exceeds the model's maximum "
                           f"({self.max_context})")
        return ids

    def generate(self, tokens: Sequence[int], max_new_tokens: int, sampler: Sampler | None = None,
                 stop_tokens: Sequence[int] = (), on_token: Callable[[int], None] | None = None,
                 images: Sequence = (), audio: Sequence = ()) -> list[int]:
        """Continue `tokens` (with `images`/`audio` as in `prefill`); returns the new ids (ending with a
        stop token if one was sampled). At the context limit generation stops early and sets
        `context_full` (what was generated is kept)."""
        if max_new_tokens < 0:
            raise G4CError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
        sampler = sampler or Sampler()
        stops = set(stop_tokens)
        new: list[int] = []
        self.context_full = False
        if max_new_tokens == 0:
            return new
        logits = self.prefill(tokens, images=images, audio=audio)
        while True:
            token = sampler(logits)
            new.append(token)
            if on_token is not None:
                on_token(token)
            if token in stops or len(new) == max_new_tokens:
                return new
            if self.position >= self.max_context:
                self.context_full = True
                return new
            logits = self.decode(token)


class Executor(Protocol):
    """Runs an artifact's programs on its device (the Relax VM here or over RPC, wgpu)."""

    def upload_weights(self, weights: list[np.ndarray]) -> None:
        """The entry functions' weights, in `Manifest.entry.weights` order, as stored (host copies may
        be dropped afterwards)."""

    def allocate_caches(self, shapes: dict[str, tuple[int, int, int]]) -> None:
        """One float32 buffer per KV slot, in `Manifest.entry.caches` order."""

    def clear_caches(self) -> None: ...

    def run(self, program: str, inputs: list[np.ndarray], cache_rows: dict[str, int]) -> np.ndarray:
        """Run `program` on `inputs` (the program's `input_names`, then the PLE rows for programs with a
        `rows` step) and the first `cache_rows[slot]` rows of each cache (an executor may pass a cache
        whole: the kernels bound themselves by position); returns its single output (logits, or an
        encoder's embeddings) as a float32 numpy array."""


class ArtifactSession(Session):
    """prefill/decode of a compiled artifact; `executor(session)` makes the executor that runs it."""

    def __init__(self, directory: str | Path, executor: Callable[[ArtifactSession], Executor],
                 max_context: int | None = None, prefill_chunk: int = 64):
        self.directory = Path(directory)
        self.manifest: Manifest = read_manifest(self.directory)
        self.config = self.manifest.config
        model = config_from_dict(self.config, source=str(self.directory / MANIFEST))  # numpy-only module
        self.vocab_size = model.input_vocab_size
        self.hidden_size = model.hidden_size
        self.max_context = min(max_context or 4096, model.max_position_embeddings)
        self.prefill_chunk = max(1, prefill_chunk)
        self.media = MediaSpec.from_json(self.manifest.media) if self.manifest.media else None
        # an image block is never split across chunks: the rings hold the longest chunk it can make
        ring_chunk = max(self.prefill_chunk, longest_image_block(self.media)) if self.media else self.prefill_chunk
        self.index_dtype = np.dtype(self.manifest.index_dtype)
        self.executor = executor(self)
        weights, self._host_tables = artifact_weights(self.directory, self.manifest, model)
        order = self.manifest.entry.weights
        missing = [n for n in order if n not in weights]
        if missing:
            raise ArtifactError(f"the artifact's weights lack {missing[0]}, which its entry functions take")
        self._check_tables(weights)
        self.executor.upload_weights([weights[n] for n in order])
        # shape/dtype stand-ins of the uploaded weights (what `g4c bench` counts for the roofline)
        self.weights = {n: np.broadcast_to(np.zeros((), a.dtype), a.shape) for n, a in weights.items()}
        del weights
        slots = self.manifest.kv_slots
        self.cache_shapes = {s: (slots[s].capacity(self.max_context, ring_chunk), slots[s].kv_heads,
                                 slots[s].head_dim) for s in self.manifest.entry.caches}
        self.executor.allocate_caches(self.cache_shapes)
        self.reset()

    def _check_tables(self, weights: dict[str, np.ndarray]) -> None:
        """Token ids index the embedding table(s) and the PLE table: the vocabulary the session admits
        is checked against the rows those tables really have, whatever the config says."""
        covered = 0  # embedding rows 0 .. covered-1, from one table or its contiguous slices
        for step in self.manifest.programs["decode"].steps:
            spec = self.manifest.kernels.get(step.kernel, {})
            if spec.get("op") in ("embed", "embed_rows", "embed_q"):
                table = weights[step.args[0][2:]]
                expected = spec.get("rows", spec.get("vocab"))
                if table.ndim != 2 or table.shape[0] != expected:
                    raise ArtifactError(f"embedding table {step.args[0][2:]} has shape {list(table.shape)}, its kernel "
                                        f"expects {expected} rows")
                if spec.get("lo", 0) == covered:
                    covered += table.shape[0]
        tables = [table.num_rows for table in self._host_tables.values()]
        available = min([covered, *tables])
        if self.vocab_size > available:
            raise ArtifactError(f"the config's vocabulary ({self.vocab_size}) exceeds the embedding rows the artifact "
                                f"holds ({available})")

    @property
    def caches(self) -> dict[str, np.ndarray]:
        """The KV caches as host arrays, where the executor keeps them in host memory (CPU)."""
        return getattr(self.executor, "host_caches", {})

    def reset(self) -> None:
        self.executor.clear_caches()
        self.position = 0

    def _run(self, name: str, ids: np.ndarray, media: dict[str, np.ndarray] | None = None) -> np.ndarray:
        length = self.position + ids.size
        arrays = {"ids": ids, "positions": np.arange(self.position, length), **(media or {})}
        inputs = self._inputs(name, arrays)
        if self.manifest.has_ple:
            inputs.append(self._ple_rows(ids))
        whole = name == "decode" and self.manifest.static_decode  # fixed shapes: caches passed whole
        rows = {s: shape[0] if whole or self.manifest.kv_slots[s].ring else length
                for s, shape in self.cache_shapes.items()}
        logits = self._execute(name, inputs, rows, "logits")
        self.position = length
        return logits

    def _run_media(self, program: str, arrays: dict[str, np.ndarray]) -> np.ndarray:
        ids = arrays.pop("ids")
        return self._run(program, ids, arrays)

    def encode(self, kind: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        name = f"encode_{kind}"
        if name not in self.manifest.programs:
            raise G4CError(f"this artifact has no {kind} encoder")
        rows = {s: shape[0] for s, shape in self.cache_shapes.items()}  # passed, not used
        return self._execute(name, self._inputs(name, inputs), rows, f"{kind} embeddings")

    def _inputs(self, name: str, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
        """A program's inputs in its order: integers in the artifact's index dtype, the rest fp32."""
        program = self.manifest.programs[name]
        dtypes = {n: d for n, _, d in program.inputs}
        return [aligned(np.ascontiguousarray(arrays[n], dtype=np.dtype(dtypes.get(n, self.index_dtype))))
                for n in program.input_names]

    def _execute(self, name: str, inputs: list[np.ndarray], rows: dict[str, int], what: str) -> np.ndarray:
        try:
            result = self.executor.run(name, inputs, rows)
        except G4CError:
            raise
        except Exception as exc:  # noqa: BLE001 - a TVM/wgpu failure inside the artifact: one line
            message = str(exc).strip().splitlines()
            raise ArtifactError(f"the compiled model failed in {name}: {message[-1] if message else type(exc).__name__}") \
                from None
        if not np.isfinite(result).all():
            raise ArtifactError(f"the compiled model produced non-finite {what} in {name} (NaN/Inf weights, or a "
                                "damaged artifact)")
        return result

    def _ple_rows(self, ids: np.ndarray) -> np.ndarray:
        """Per-layer-embedding rows of these tokens, read from the host table (memory-mapped file)."""
        (table,) = self.manifest.host_tables
        return aligned(self._host_tables[table].rows(ids))


class HostTable:
    """A table kept in host memory (a memory-mapped safetensors slice or an array) and read row by row;
    a quantized table's rows are dequantized as they are read."""

    def __init__(self, data, scales=None, scheme: str | None = None):
        self.data, self.scales, self.scheme = data, scales, scheme

    @property
    def num_rows(self) -> int:
        shape = self.data.get_shape() if hasattr(self.data, "get_shape") else self.data.shape
        return int(shape[0])

    def rows(self, ids: np.ndarray) -> np.ndarray:
        def gather(view) -> np.ndarray:
            return np.concatenate([view[int(i): int(i) + 1] for i in ids])

        if self.scheme is None:
            return gather(self.data).astype(np.float32)
        from g4c.quant import dequantize

        return dequantize(gather(self.data), gather(self.scales), self.scheme)


def _host_tables(manifest: Manifest, open_tensor) -> dict[str, HostTable]:
    q = manifest.host_quant
    if q is None:
        return {t: HostTable(open_tensor(t)) for t in manifest.host_tables}
    return {t: HostTable(open_tensor(f"{t}.{q}"), open_tensor(f"{t}.{q}_scales"), q) for t in manifest.host_tables}


def artifact_weights(directory: Path, manifest: Manifest, model) -> tuple[dict[str, np.ndarray], dict]:
    """(weights as stored, {host table: row-sliceable}) of an artifact: read from its files (aligned;
    host tables memory-mapped), or regenerated from the seed for --weights-from-seed artifacts."""
    from safetensors import safe_open

    if manifest.weights_from_seed is not None:
        return seeded_weights(manifest, model)
    weights = read_aligned_safetensors(directory / WEIGHTS, mapped=True)  # used in place on the CPU
    if not manifest.host_tables:
        return weights, {}
    host = safe_open(str(directory / HOST), framework="numpy")
    try:
        return weights, _host_tables(manifest, host.get_slice)
    except Exception as exc:  # noqa: BLE001 - safetensors' own error types: one line
        raise ArtifactError(f"{HOST}: {exc}") from None


def seeded_weights(manifest: Manifest, model) -> tuple[dict[str, np.ndarray], dict[str, HostTable]]:
    """The weights (as stored) and host tables of a `--weights-from-seed` artifact, regenerated from
    the seed exactly as the compiler made them (g4c.weights is numpy-only)."""
    from g4c.dtypes import numpy_dtype
    from g4c.weights import RandomWeights

    spec = manifest.weights_from_seed
    source = RandomWeights(model, spec["seed"], spec["dtype"])
    recipes, stored_in_weight_dtype = manifest.weight_recipes, set(manifest.weight_dtype_tensors)

    def stored(name: str) -> np.ndarray:
        array = derived_weight(name, recipes, base)
        if "quant" in recipes.get(name, {}):  # uint32 words or fp32 scales, as the compiler wrote them
            return aligned(array)
        dtype = manifest.weight_dtype if name in stored_in_weight_dtype else "float32"
        array = np.asarray(array, dtype=np.float32).astype(numpy_dtype(dtype))
        return aligned(array.view(np.uint16) if dtype == "bfloat16" else array)

    def base(name: str) -> np.ndarray:
        return source.get(name).astype(np.float32)

    @functools.lru_cache(maxsize=1)
    def quantized(table: str) -> tuple[np.ndarray, np.ndarray]:  # data and scales from one pass
        from g4c.quant import quantize

        return quantize(base(table), manifest.host_quant)

    def host_tensor(name: str) -> np.ndarray:
        q = manifest.host_quant
        if q is None:
            return base(name).astype(numpy_dtype(manifest.weight_dtype))
        table, _, part = name.rpartition(f".{q}")
        return quantized(table)[part == "_scales"]

    host = _host_tables(manifest, host_tensor)
    return {n: stored(n) for n in manifest.entry.weights}, host
