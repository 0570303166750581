"""Gemma 4 GGUF files (llama.cpp's `convert_hf_to_gguf.py`, architecture `gemma4`) as a MODEL.

`load_gguf(path)` returns the `ModelConfig` (built as the Hugging Face config dict the file was
converted from, then `config_from_dict`) and a `WeightSource` that reads tensors lazily from the
memory-mapped file with `gguf.GGUFReader`, under g4c's canonical (transformers) names.

What the converter does to Gemma 4 (llama.cpp `conversion/gemma.py`: `Gemma4Model(Gemma3Model)`,
`TextModel` in `conversion/base.py`; the loader is `src/models/gemma4.cpp`), and how it is undone here:
- names: `gguf.get_tensor_name_map(GEMMA4)` (`blk.N.attn_q.weight` ← `layers.N.self_attn.q_proj.weight`,
  ...); `layer_scalar` → `blk.N.layer_output_scale.weight`, `router.scale` → `blk.N.ffn_gate_inp.scale`,
  `router.per_expert_scale` → `blk.N.ffn_down_exps.scale`, experts → `blk.N.ffn_gate_up_exps.weight`
  / `ffn_down_exps.weight` (fused, [E, 2·I, H] as transformers stores it; the split
  `ffn_gate_exps` + `ffn_up_exps` layout llama.cpp also loads is concatenated back, gate first).
- values: none are changed. Gemma 4's `norm_shift` is 0 (Gemma 1-3 converters store RMSNorm
  weights as w + 1; Gemma 4's transformers norm already multiplies by w), q/k are not permuted,
  shapes are transformers' (GGUF lists dimensions reversed; numpy order is used here).
- added: `rope_freqs.weight` [global_head_dim / 2] = 1 for rotated pairs, 1e30 for the others:
  llama.cpp's encoding of the global layers' `proportional` RoPE; it gives `partial_rotary_factor`
  and is not a model weight.
- types: 1-D tensors, norms, the router matrix and the `.scale` tensors are F32; the other matrices
  are the file type (F32, F16, BF16, Q8_0; llama-quantize writes Q4_0, K-quants, ...).

Q8_0 and Q4_0 tensors are also offered as they are stored (`quantized(name)`): their blocks are
g4c.quant's `q8`/`q4` layout byte for byte, so the compiler can use them without requantizing.
`get(name)` always returns float32: F16/BF16 exactly, Q8_0/Q4_0 dequantized exactly as llama.cpp
does (q · d). K-quants (Q2_K..Q6_K), Q4_1/Q5_0/Q5_1 and the IQ types are converted to float32 with
`gguf.quants.dequantize`: g4c has no kernels for them, so a compile requantizes those float values
(or keeps them in float), adding that second rounding error on top of the file's own.

Refused with one line (`GGUFError`, a `WeightError`): another architecture, a truncated or corrupt
file, a split (multi-file) GGUF, big-endian files, a tensor type g4c cannot read (named with the
tensor), missing or unknown tensors, metadata g4c cannot represent.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path
from typing import Any

import numpy as np

from g4c.config import FULL, SLIDING, ModelConfig, config_from_dict
from g4c.errors import ConfigError, G4CError, WeightError
from g4c.weights import check_regular_file, expected_shapes

ARCH = "gemma4"
MAGIC = b"GGUF"

# GGUF tensor name (below `blk.N.`) → g4c canonical name (below `layers.N.`), and the global ones.
GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "per_layer_token_embd.weight": "embed_tokens_per_layer.weight",
    "per_layer_model_proj.weight": "per_layer_model_projection.weight",
    "per_layer_proj_norm.weight": "per_layer_projection_norm.weight",
}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "post_ffw_norm_1.weight": "post_feedforward_layernorm_1.weight",
    "post_ffw_norm_2.weight": "post_feedforward_layernorm_2.weight",
    "pre_ffw_norm_2.weight": "pre_feedforward_layernorm_2.weight",
    "layer_output_scale.weight": "layer_scalar",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "inp_gate.weight": "per_layer_input_gate.weight",
    "proj.weight": "per_layer_projection.weight",
    "post_norm.weight": "post_per_layer_input_norm.weight",
    "ffn_gate_inp.weight": "router.proj.weight",
    "ffn_gate_inp.scale": "router.scale",
    "ffn_down_exps.scale": "router.per_expert_scale",
    "ffn_gate_up_exps.weight": "experts.gate_up_proj",
    "ffn_down_exps.weight": "experts.down_proj",
}
SPLIT_EXPERTS = ("ffn_gate_exps.weight", "ffn_up_exps.weight")  # concatenated (gate, up) into gate_up_proj
ROPE_FREQS = "rope_freqs.weight"
LONG_ARRAY = 4096  # metadata arrays longer than this (the vocabulary) are skipped, not parsed

# GGML types: stored as q8/q4 blocks g4c's kernels read as they are; floats; converted with gguf.quants.
NATIVE_SCHEMES = {"Q8_0": "q8", "Q4_0": "q4"}
FLOAT_TYPES = ("F32", "F16", "BF16")
CONVERTED_TYPES = ("Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS",
                   "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4")
FILE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}  # general.file_type (LlamaFileType) → config dtype


class GGUFError(WeightError):
    """A GGUF file g4c cannot use as a Gemma 4 model; the message is one line naming the culprit."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise G4CError("reading a GGUF model needs the `gguf` package (pip install gguf)") from None
    return gguf


def is_gguf(path: str | os.PathLike) -> bool:
    """A MODEL argument that names a GGUF file: a path ending in `.gguf` that is not a directory, or a
    regular file that starts with the GGUF magic."""
    p = Path(path)
    if p.is_dir():
        return False
    if str(path).lower().endswith(".gguf"):
        return True
    try:
        if not stat.S_ISREG(os.stat(p).st_mode):
            return False
        with open(p, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def load_gguf(path: str | os.PathLike) -> tuple[ModelConfig, "GGUFWeights"]:
    """(config, weight source) of a Gemma 4 GGUF file; see the module docstring."""
    source = GGUFWeights(path)
    return source.cfg, source


def gguf_config(path: str | os.PathLike) -> ModelConfig:
    return GGUFWeights(path).cfg


# ---- reading the file ----------------------------------------------------------------------------
def _reader_class():
    gguf = _gguf()

    types = gguf.GGUFValueType
    sizes = {t: np.dtype(d).itemsize for t, d in gguf.GGUFReader.gguf_scalar_to_np.items()}

    class Reader(gguf.GGUFReader):
        """gguf's reader with two changes: long metadata arrays (the vocabulary: 262144 tokens, scores
        and types, 514906 merges) are skipped instead of becoming a numpy view per element, which takes
        gguf's reader ~25 s (their fields read as empty; g4c's tokenizer reads them itself); a tensor of
        a GGML type id this gguf version does not know is refused naming the tensor (gguf raises a bare
        ValueError from the enum)."""

        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type == types.ARRAY:
                item = int(self._get(orig_offs, np.uint32)[0])
                count = int(self._get(orig_offs + 4, np.uint64)[0])
                if count > LONG_ARRAY and item in sizes:
                    size = 12 + count * sizes[types(item)]
                elif count > LONG_ARRAY and item == types.STRING:
                    order = "<" if self.byte_order == "I" else ">"
                    offs, u64 = orig_offs + 12, struct.Struct(order + "Q")
                    for _ in range(count):
                        offs += 8 + u64.unpack_from(self.data, offs)[0]
                    size = offs - orig_offs
                else:
                    return super()._get_field_parts(orig_offs, raw_type)
                return size, [self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)], [], \
                    [types.ARRAY, types(item)]
            return super()._get_field_parts(orig_offs, raw_type)

        def _build_tensors(self, start_offs, fields):
            for field in fields:
                raw = int(field.parts[4][0])
                try:
                    gguf.GGMLQuantizationType(raw)
                except ValueError:
                    name = bytes(field.parts[1]).decode("utf-8", "replace")
                    raise _UnknownType(name, raw) from None
            return super()._build_tensors(start_offs, fields)

    return Reader


class _UnknownType(Exception):
    def __init__(self, name: str, raw: int):
        super().__init__(name, raw)
        self.name, self.raw = name, raw


def _open(path: Path):
    from g4c.tokenizer import check_gguf

    check_regular_file(path, "GGUF model file")
    try:
        check_gguf(path)  # every string, array and tensor's data inside the file: truncation is one line
    except G4CError as exc:
        raise GGUFError(str(exc)) from None
    try:
        reader = _reader_class()(str(path))
    except _UnknownType as exc:
        raise GGUFError(f"{path}: tensor {exc.name} has GGML type id {exc.raw}, which this gguf package does not "
                        "know (a newer llama.cpp type?); g4c cannot read it") from None
    except (OSError, ValueError, KeyError, IndexError, TypeError, OverflowError, UnicodeDecodeError) as exc:
        raise GGUFError(f"{path}: not a readable GGUF file ({exc})") from None
    if reader.byte_order != "I":
        raise GGUFError(f"{path}: a byte-swapped (big-endian) GGUF file; g4c reads little-endian GGUF files")
    return reader


class _Meta:
    """Typed access to the key/value metadata, with one-line errors naming the key."""

    def __init__(self, path: Path, reader, gguf):
        self.path, self.fields, self.gguf = path, reader.fields, gguf
        self.types = gguf.GGUFValueType
        self.ints = {self.types.UINT8, self.types.INT8, self.types.UINT16, self.types.INT16, self.types.UINT32,
                     self.types.INT32, self.types.UINT64, self.types.INT64}

    def has(self, key: str) -> bool:
        return key in self.fields

    def _fail(self, key: str, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: metadata {key}: {what}")

    def _scalar(self, key: str, allowed: set, what: str):
        field = self.fields[key]
        if field.types[0] not in allowed:
            raise self._fail(key, f"expected {what}, got {self._describe(field)}")
        return field.contents()

    def _describe(self, field) -> str:
        kind = field.types[0].name.lower()
        return f"an array of {field.types[-1].name.lower()}" if field.types[0] == self.types.ARRAY else f"a {kind}"

    def uint(self, key: str, default: Any = ...) -> Any:
        if key not in self.fields:
            if default is ...:
                raise GGUFError(f"{self.path}: metadata {key} is missing (llama.cpp's converter writes it)")
            return default
        value = int(self._scalar(key, self.ints, "an integer"))
        if value < 0:
            raise self._fail(key, f"must be >= 0, got {value}")
        return value

    def float(self, key: str, default: Any = ...) -> Any:
        if key not in self.fields:
            if default is ...:
                raise GGUFError(f"{self.path}: metadata {key} is missing (llama.cpp's converter writes it)")
            return default
        value = self._scalar(key, self.ints | {self.types.FLOAT32, self.types.FLOAT64}, "a number")
        return _shortest_float(value, self.fields[key].types[0] == self.types.FLOAT32)

    def string(self, key: str, default: Any = ...) -> Any:
        if key not in self.fields:
            if default is ...:
                raise GGUFError(f"{self.path}: metadata {key} is missing")
            return default
        return self._scalar(key, {self.types.STRING}, "a string")

    def per_layer(self, key: str, n: int, kind: str, default: Any = ...) -> list:
        """A value per layer: an array of n entries, or one scalar for every layer (llama.cpp's
        get_key_or_arr). kind: 'uint' or 'bool'."""
        if key not in self.fields:
            if default is ...:
                raise GGUFError(f"{self.path}: metadata {key} is missing (llama.cpp's converter writes it)")
            return [default] * n
        field = self.fields[key]
        allowed = self.ints if kind == "uint" else {self.types.BOOL}
        what = "integers" if kind == "uint" else "booleans"
        if field.types[0] == self.types.ARRAY:
            if len(field.types) != 2 or field.types[1] not in allowed:
                raise self._fail(key, f"expected {what} (one per layer), got {self._describe(field)}")
            values = field.contents()
            if len(values) != n:
                raise self._fail(key, f"has {len(values)} entries but block_count is {n}")
        else:
            values = [self._scalar(key, allowed, f"{what} (one per layer)")] * n
        if kind == "bool":
            return [bool(v) for v in values]
        values = [int(v) for v in values]
        if any(v < 0 for v in values):
            raise self._fail(key, "values must be >= 0")
        return values


def _shortest_float(value, f32: bool) -> float:
    """The float the converter wrote: GGUF stores float32, whose shortest decimal form is the config
    value (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(value))) if f32 else float(value)


# ---- the weight source ---------------------------------------------------------------------------
class GGUFWeights:
    """A Gemma 4 GGUF file as a g4c `WeightSource` (names, shape, dtype, get) plus `rows` for table
    rows, `quantized`/`quantized_scheme` for Q8_0/Q4_0 tensors as stored and `ggml_type` per tensor.
    Tensors are memory-mapped views until `get` converts one."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._gguf = gguf = _gguf()
        reader = _open(self.path)
        self._meta = meta = _Meta(self.path, reader, gguf)
        arch = meta.string("general.architecture", None)
        if arch != ARCH:
            what = f"of architecture {arch!r}" if arch is not None else "without general.architecture"
            raise GGUFError(f"{self.path}: a GGUF model {what}; g4c compiles Gemma 4 (architecture {ARCH!r}) models")
        if meta.uint("split.count", 1) > 1:
            raise GGUFError(f"{self.path}: part of a split GGUF model ({meta.uint('split.count')} files); merge it "
                            "first with `llama-gguf-split --merge`")
        self._tensors = {t.name: t for t in reader.tensors}
        for tensor in reader.tensors:
            self._check_type(tensor)
        self._sources = self._map_names()
        self.cfg = self._config()
        self._check_tensors()

    # -- names and types --
    def _check_type(self, tensor) -> None:
        kind = tensor.tensor_type.name
        if kind in FLOAT_TYPES or kind in NATIVE_SCHEMES:
            return
        if kind in CONVERTED_TYPES and tensor.tensor_type in _dequantizable(self._gguf):
            return
        hint = (" (NVFP4 tensors come with separate scale tensors g4c does not map)" if kind == "NVFP4" else "")
        raise GGUFError(f"{self.path}: tensor {tensor.name} has GGML type {kind}, which g4c does not read{hint} "
                        f"(supported: {', '.join(FLOAT_TYPES + tuple(NATIVE_SCHEMES))}, converted to float32: "
                        "K-quants, Q4_1, Q5_0, Q5_1, IQ, TQ and MXFP4)")

    def _map_names(self) -> dict[str, list[str]]:
        """canonical name → the GGUF tensor(s) it is read from (two for split gate/up experts)."""
        out: dict[str, list[str]] = {}
        split: dict[int, dict[str, str]] = {}
        for name in self._tensors:
            if name == ROPE_FREQS:
                continue
            if name in GLOBAL_NAMES:
                out[GLOBAL_NAMES[name]] = [name]
                continue
            parts = name.split(".", 2)
            if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
                if parts[2] in LAYER_NAMES:
                    out[f"layers.{int(parts[1])}.{LAYER_NAMES[parts[2]]}"] = [name]
                    continue
                if parts[2] in SPLIT_EXPERTS:
                    split.setdefault(int(parts[1]), {})[parts[2]] = name
                    continue
            raise GGUFError(f"{self.path}: unknown tensor {name}: not part of llama.cpp's Gemma 4 text model "
                            "(a vision/audio projector belongs in the separate mmproj file)")
        for layer, pair in sorted(split.items()):
            missing = [p for p in SPLIT_EXPERTS if p not in pair]
            if missing:
                raise GGUFError(f"{self.path}: missing tensor blk.{layer}.{missing[0]} (its pair "
                                f"{next(iter(pair.values()))} is present)")
            if f"layers.{layer}.experts.gate_up_proj" in out:
                raise GGUFError(f"{self.path}: layer {layer} has both ffn_gate_up_exps and ffn_gate_exps/ffn_up_exps")
            gate, up = (pair[p] for p in SPLIT_EXPERTS)
            if self._np_shape(gate) != self._np_shape(up):
                raise GGUFError(f"{self.path}: tensors {gate} and {up} have different shapes "
                                f"{list(self._tensors[gate].shape)} and {list(self._tensors[up].shape)}")
            out[f"layers.{layer}.experts.gate_up_proj"] = [gate, up]
        return out

    def gguf_names(self, name: str) -> list[str]:
        """The GGUF tensor(s) a canonical tensor is read from."""
        return list(self._sources[name])

    def names(self) -> list[str]:
        return list(self._sources)

    def _np_shape(self, gguf_name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[gguf_name].shape.tolist()))

    def shape(self, name: str) -> tuple[int, ...]:
        shapes = [self._np_shape(n) for n in self._sources[name]]
        if len(shapes) == 1:
            return shapes[0]
        return (*shapes[0][:-2], sum(s[-2] for s in shapes), shapes[0][-1])

    def dtype(self, name: str) -> str:
        return "float32"  # what get() returns; ggml_type() is the stored type

    def ggml_type(self, name: str) -> str:
        kinds = {self._tensors[n].tensor_type.name for n in self._sources[name]}
        return kinds.pop() if len(kinds) == 1 else "+".join(sorted(kinds))

    # -- values --
    def _float32(self, gguf_name: str, rows: np.ndarray | None = None) -> np.ndarray:
        tensor = self._tensors[gguf_name]
        data = tensor.data if rows is None else tensor.data[rows]
        kind = tensor.tensor_type
        if kind == self._gguf.GGMLQuantizationType.F32:
            return np.array(data, dtype=np.float32)
        values = self._gguf.quants.dequantize(np.asarray(data), kind)
        return np.ascontiguousarray(values, dtype=np.float32)

    def get(self, name: str) -> np.ndarray:
        parts = [self._float32(n) for n in self._sources[name]]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-2)

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """float32 rows `ids` of a 2-D table (the PLE table per token), converting only those rows."""
        (gguf_name,) = self._sources[name]
        return self._float32(gguf_name, np.asarray(ids, dtype=np.int64))

    def quantized_scheme(self, name: str) -> str | None:
        kinds = {self._tensors[n].tensor_type.name for n in self._sources[name]}
        if len(kinds) != 1:
            return None
        return NATIVE_SCHEMES.get(kinds.pop())

    def quantized(self, name: str) -> tuple[str, np.ndarray, np.ndarray] | None:
        """("q8"|"q4", data uint32 [..., K·bits/32], scales float32 [..., K/32]) for a tensor stored as
        Q8_0/Q4_0: the file's blocks unchanged (fp16 d → float32 scale, the 32/16 quant bytes → the
        words of g4c.quant's layout); None for any other stored type."""
        scheme = self.quantized_scheme(name)
        if scheme is None:
            return None
        parts = [self._blocks(n, scheme) for n in self._sources[name]]
        if len(parts) == 1:
            return scheme, *parts[0]
        return (scheme, np.concatenate([d for d, _ in parts], axis=-2),
                np.concatenate([s for _, s in parts], axis=-2))

    def _blocks(self, gguf_name: str, scheme: str) -> tuple[np.ndarray, np.ndarray]:
        raw = np.asarray(self._tensors[gguf_name].data, dtype=np.uint8)
        block = 2 + (32 if scheme == "q8" else 16)
        lead = raw.shape[:-1]
        blocks = raw.reshape(*lead, raw.shape[-1] // block, block)
        scales = np.ascontiguousarray(blocks[..., :2]).view("<f2")[..., 0].astype(np.float32)
        words = np.ascontiguousarray(blocks[..., 2:]).view("<u4").reshape(*lead, -1).astype(np.uint32, copy=False)
        return words, scales

    # -- config --
    def _config(self) -> ModelConfig:
        meta, path, key = self._meta, self.path, lambda k: f"{ARCH}.{k}"
        n = meta.uint(key("block_count"))
        if not 1 <= n <= 1024:
            raise GGUFError(f"{path}: metadata {key('block_count')}: {n} layers (g4c supports 1..1024)")
        swa = meta.per_layer(key("attention.sliding_window_pattern"), n, "bool")
        types = [SLIDING if s else FULL for s in swa]
        shared = meta.uint(key("attention.shared_kv_layers"), 0)
        heads = _constant(path, key("attention.head_count"), meta.per_layer(key("attention.head_count"), n, "uint"))
        kv = meta.per_layer(key("attention.head_count_kv"), n, "uint", heads)
        ff = meta.per_layer(key("feed_forward_length"), n, "uint")
        head_full = meta.uint(key("attention.key_length"))
        head_swa = meta.uint(key("attention.key_length_swa"), head_full)
        for name, k, v in (("", head_full, meta.uint(key("attention.value_length"), head_full)),
                           ("_swa", head_swa, meta.uint(key("attention.value_length_swa"), head_swa))):
            if k != v:
                raise GGUFError(f"{path}: metadata {key('attention.value_length' + name)} is {v} but key_length{name} "
                                f"is {k}; Gemma 4 has equal K and V head sizes")
        if meta.has(key("rope.scaling.type")) and meta.string(key("rope.scaling.type")) not in ("none", ""):
            raise GGUFError(f"{path}: metadata {key('rope.scaling.type')} is "
                            f"{meta.string(key('rope.scaling.type'))!r}; g4c supports no RoPE scaling")
        theta = meta.float(key("rope.freq_base"), 10_000.0)
        theta_swa = meta.float(key("rope.freq_base_swa"), theta)
        for suffix, head, layer_type in (("", head_full, FULL), ("_swa", head_swa, SLIDING)):
            rot = meta.uint(key("rope.dimension_count" + suffix), head)
            if rot != head and layer_type in types:  # llama.cpp would rotate only the first `rot` dims (neox)
                raise GGUFError(f"{path}: metadata {key('rope.dimension_count' + suffix)} is {rot}, not the head size "
                                f"{head}: partial RoPE other than Gemma 4's rope_freqs encoding is not supported")
        softcap = meta.float(key("final_logit_softcapping"), 0.0)
        ple = meta.uint(key("embedding_length_per_layer_input"), 0)

        embed = self._tensor_shape("token_embd.weight")
        hidden = meta.uint(key("embedding_length"))
        if len(embed) != 2 or embed[1] != hidden:
            raise GGUFError(f"{path}: tensor token_embd.weight has shape {list(embed)}, expected [vocab, {hidden}] "
                            f"(embedding_length {hidden})")
        raw: dict[str, Any] = {
            "model_type": "gemma4_text", "vocab_size": embed[0], "hidden_size": hidden,
            "num_hidden_layers": n, "num_attention_heads": heads, "layer_types": types,
            "num_kv_shared_layers": shared, "rms_norm_eps": meta.float(key("attention.layer_norm_rms_epsilon")),
            "max_position_embeddings": meta.uint(key("context_length"), 131_072),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "final_logit_softcapping": softcap or None,  # llama.cpp: 0 = no softcap
            "hidden_size_per_layer_input": ple,
            "head_dim": head_swa,
            "dtype": FILE_DTYPES.get(meta.uint("general.file_type", 0), "float32"),
        }
        if SLIDING in types:
            raw["sliding_window"] = meta.uint(key("attention.sliding_window"))
        if ple:
            raw["vocab_size_per_layer_input"] = self._tensor_shape("per_layer_token_embd.weight")[0]
        first_shared = n - shared if 0 <= shared < n else n
        raw.update(self._attention(types, kv, head_full, first_shared))
        raw["rope_parameters"] = self._rope(types, theta, theta_swa, head_full)
        raw.update(self._mlp(ff, first_shared))
        raw.update(self._moe(n))
        for field, gkey in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("pad_token_id", "tokenizer.ggml.padding_token_id")):
            if meta.has(gkey):
                raw[field] = meta.uint(gkey)
        if meta.has("tokenizer.ggml.eos_token_id"):
            eos = [meta.uint("tokenizer.ggml.eos_token_id")]
            if meta.has("tokenizer.ggml.eot_token_id") and meta.uint("tokenizer.ggml.eot_token_id") not in eos:
                eos.append(meta.uint("tokenizer.ggml.eot_token_id"))  # Gemma's <turn|> ends a chat turn
            raw["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        try:
            return config_from_dict(raw, source=str(path))
        except ConfigError as exc:
            raise GGUFError(f"{path}: the GGUF metadata gives an invalid Gemma 4 config ({exc})") from None

    def _tensor_shape(self, gguf_name: str) -> tuple[int, ...]:
        if gguf_name not in self._tensors:
            raise GGUFError(f"{self.path}: missing tensor {gguf_name}")
        return self._np_shape(gguf_name)

    def _attention(self, types: list[str], kv: list[int], head_full: int, first_shared: int) -> dict[str, Any]:
        """KV heads per layer type, the global layers' overrides and k_eq_v (global layers without
        attn_v: llama.cpp then uses K as V, transformers' attention_k_eq_v)."""
        path = self.path
        by_type: dict[str, set[int]] = {t: {kv[i] for i, x in enumerate(types) if x == t} for t in set(types)}
        for t, values in by_type.items():
            if len(values) > 1:
                raise GGUFError(f"{path}: metadata {ARCH}.attention.head_count_kv: {t} layers have different KV-head "
                                f"counts {sorted(values)}; g4c needs one per layer type")
        kv_swa = next(iter(by_type.get(SLIDING, by_type.get(FULL))))
        kv_full = next(iter(by_type.get(FULL, {kv_swa})))
        own = [i for i in range(first_shared)]
        no_v = {i for i in own if f"blk.{i}.attn_v.weight" not in self._tensors}
        sliding_no_v = sorted(i for i in no_v if types[i] == SLIDING)
        if sliding_no_v:
            raise GGUFError(f"{path}: missing tensor blk.{sliding_no_v[0]}.attn_v.weight (sliding layers have a V "
                            "projection)")
        full_own = [i for i in own if types[i] == FULL]
        k_eq_v = bool(full_own) and all(i in no_v for i in full_own)
        if not k_eq_v and any(i in no_v for i in full_own):
            missing = next(i for i in full_own if i in no_v)
            raise GGUFError(f"{path}: missing tensor blk.{missing}.attn_v.weight (other global layers have one; "
                            "g4c needs all or none)")
        override: dict[str, int] = {"head_dim": head_full}
        if k_eq_v or kv_full != kv_swa:
            override["num_key_value_heads"] = kv_full
        return {"num_key_value_heads": kv_swa, "attention_k_eq_v": k_eq_v,
                "per_layer_config": {str(i): dict(override) for i, t in enumerate(types) if t == FULL}}

    def _rope(self, types: list[str], theta: float, theta_swa: float, head_full: int) -> dict[str, dict]:
        out: dict[str, dict] = {SLIDING: {"rope_type": "default", "rope_theta": theta_swa}}
        if FULL not in types:
            out[FULL] = {"rope_type": "default", "rope_theta": theta}
            return out
        if ROPE_FREQS not in self._tensors:  # llama.cpp then rotates every pair of the global layers
            out[FULL] = {"rope_type": "default", "rope_theta": theta}
            return out
        freqs = self._float32(ROPE_FREQS).reshape(-1)
        half = head_full // 2
        rotated = int(np.count_nonzero(freqs == 1.0))
        if freqs.shape[0] != half or not (np.all(freqs[:rotated] == 1.0) and np.all(freqs[rotated:] >= 1e20)):
            raise GGUFError(f"{self.path}: tensor {ROPE_FREQS} is not Gemma 4's proportional-RoPE encoding "
                            f"({half} factors: 1 for rotated pairs, then 1e30); other frequency factors are not supported")
        if rotated == half:
            out[FULL] = {"rope_type": "default", "rope_theta": theta}
            return out
        out[FULL] = {"rope_type": "proportional", "partial_rotary_factor": _rotary_factor(rotated, head_full),
                     "rope_theta": theta}
        return out

    def _mlp(self, ff: list[int], first_shared: int) -> dict[str, Any]:
        base = set(ff[:first_shared])
        if len(base) != 1:
            raise GGUFError(f"{self.path}: metadata {ARCH}.feed_forward_length: layers have different widths "
                            f"{sorted(base)}; g4c supports one (doubled on KV-shared layers)")
        width = base.pop()
        tail = set(ff[first_shared:])
        if not tail <= {width} and tail != {2 * width}:
            raise GGUFError(f"{self.path}: metadata {ARCH}.feed_forward_length: KV-shared layers have widths "
                            f"{sorted(tail)}; expected {width} or {2 * width} (double-wide MLP)")
        return {"intermediate_size": width, "use_double_wide_mlp": tail == {2 * width}}

    def _moe(self, n: int) -> dict[str, Any]:
        meta, key = self._meta, lambda k: f"{ARCH}.{k}"
        moe = [f"blk.{i}.ffn_gate_inp.weight" in self._tensors for i in range(n)]
        if not any(moe):
            return {"enable_moe_block": False}
        if not all(moe):
            i = moe.index(False)
            raise GGUFError(f"{self.path}: missing tensor blk.{i}.ffn_gate_inp.weight (other layers have experts; "
                            "g4c needs a MoE block in every layer or none)")
        return {"enable_moe_block": True, "num_experts": meta.uint(key("expert_count")),
                "top_k_experts": meta.uint(key("expert_used_count")),
                "moe_intermediate_size": meta.uint(key("expert_feed_forward_length"))}

    def _check_tensors(self) -> None:
        """Every tensor the config needs, under its GGUF name, with the shape llama.cpp expects;
        extra per-layer K/V tensors of KV-shared layers are left to `Weights` (it ignores them)."""
        from g4c.weights import validate

        expected = expected_shapes(self.cfg)
        for name, shape in expected.items():
            if name not in self._sources:
                raise GGUFError(f"{self.path}: missing tensor {_gguf_name(name)} (g4c's {name}, expected shape "
                                f"{list(shape)} in numpy order, {list(reversed(shape))} as GGUF lists it)")
            if self.shape(name) != shape:
                raise GGUFError(f"{self.path}: tensor {'+'.join(self._sources[name])} has shape "
                                f"{list(reversed(self.shape(name)))} (GGUF order) but the metadata gives "
                                f"{list(reversed(shape))}")
        try:
            validate(self.cfg, self)
        except WeightError as exc:
            raise GGUFError(f"{self.path}: {exc}") from None


def _constant(path: Path, key: str, values: list[int]) -> int:
    if len(set(values)) != 1:
        raise GGUFError(f"{path}: metadata {key}: layers differ ({sorted(set(values))}); g4c supports one value")
    return values[0]


def _rotary_factor(pairs: int, head_dim: int) -> float:
    """A partial_rotary_factor f that rotates `pairs` pairs both as transformers counts them
    (int(f * head_dim // 2)) and as the converter did (int(head_dim * f / 2)). The file only keeps the
    count, so Gemma 4's published 0.25 is preferred when it gives that count (the same RoPE either
    way); otherwise 2·pairs/head_dim, nudged up if float rounding loses a pair."""
    if int(0.25 * head_dim // 2) == pairs == int(head_dim * 0.25 / 2):
        return 0.25
    factor = 2 * pairs / head_dim
    for _ in range(4):
        if int(factor * head_dim // 2) == pairs:
            return factor
        factor = float(np.nextafter(factor, 1.0))
    return factor


def _dequantizable(gguf) -> set:
    try:
        from gguf.quants import _type_traits  # gguf's table of numpy (de)quantizers
        return set(_type_traits)
    except ImportError:
        return set()


def _gguf_name(canonical: str) -> str:
    """The GGUF tensor name of a canonical name (for messages)."""
    reverse_global = {v: k for k, v in GLOBAL_NAMES.items()}
    if canonical in reverse_global:
        return reverse_global[canonical]
    parts = canonical.split(".", 2)
    reverse_layer = {v: k for k, v in LAYER_NAMES.items()}
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in reverse_layer:
        return f"blk.{parts[1]}.{reverse_layer[parts[2]]}"
    return canonical


__all__ = ["GGUFError", "GGUFWeights", "gguf_config", "is_gguf", "load_gguf"]
