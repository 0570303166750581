"""Checkpoints in the compressed-tensors format (vLLM / llm-compressor's int4 and int8 "w4a16"/"w8a16"
weights, as Google's QAT releases of Gemma 4 ship) as a weight source whose quantized matrices are
compiled as they are stored: repacked bit by bit into g4c.quant's q4/q8 layout, never requantized.

The format (compressed-tensors 0.20: `compressors/pack_quantized`, `quantization/quant_args.py`).
`config.json` has a `quantization_config` with `quant_method: "compressed-tensors"`, `config_groups`
(each group: `targets` — module names, `re:` regexes or class names such as `Linear` —, `weights`,
`input_activations`, `output_activations`, `format`), an `ignore` list of the same kinds of targets, a
global `format`, `kv_cache_scheme`, `transform_config`. Each quantized Linear (or Embedding) module
`<m>` stores, instead of `<m>.weight` [N, K]:
- `<m>.weight_packed` int32 [N, K·bits/32]: the codes q ∈ [−2^(bits−1), 2^(bits−1)) (round to
  nearest of w / scale, clamped) plus 2^(bits−1), packed densely along K by `pack_to_int32`: code i of
  a row at bit i·bits of the row's bit string, i.e. bit (i·bits) mod 32 of word i·bits/32. The words
  are little-endian, so for int4 byte j of a row holds code 2j in its low nibble and 2j+1 in its high
  nibble (nibble = q + 8); for int8 byte i holds code i (byte = q + 128);
- `<m>.weight_scale` [N, K/G] in the model's float dtype (fp32, bf16 or fp16): one scale per group of
  G consecutive weights of a row (`strategy: "group"`, `group_size: G`); w = q · scale;
- `<m>.weight_shape` int64 [2]: (N, K);
- asymmetric schemes add `<m>.weight_zero_point` (w = (q − z) · scale), GPTQ's group activation order
  `<m>.weight_g_idx` (the group of each column), activation quantization `<m>.input_scale`, ...
The `naive-quantized` format keeps `<m>.weight` as int8 codes (two's complement) with the same scales.
Names are transformers' module names, as every checkpoint's (`model.` / `model.language_model.`
prefixes, `lm_head` outside them): `<m>.weight_packed` is g4c's tensor `<m>.weight` (g4c/weights.py).

How it maps onto g4c.quant, and why the values are the same: a g4c q4 group is 32 consecutive codes of
a row as Q4_0 lays them out (byte b: code b in the low nibble, code b + 16 in the high one, nibble =
q + 8, w = (nibble − 8) · scale), with one float32 scale. Compressed-tensors' nibbles are the same
numbers (q + 8), only in another order, so each row's nibbles are unpacked and repacked (bit
manipulation only); a group of G = 32·r weights is r g4c groups with the same scale (each scale
repeated r times); bf16/fp16 scales are exact in float32. int8 maps onto q8 (code e of a group in byte
e, two's complement, w = q · scale) by flipping each byte's top bit (q + 128 → q). So `quantized(name)`
gives blocks whose dequantized values are exactly compressed-tensors' q · scale: the fp32 products its
`dequantize` computes with fp32 scales, and with bf16/fp16 scales the exact products (q has at most 8
significant bits and such a scale at most 11, so q · scale is exact in fp32; compressed-tensors and
vLLM's kernels round it to bf16/fp16). The pack-quantized int4 data is repacked without unpacking it
(`quantized`); `get(name)` computes the float32 values from the unpacked codes (for the reference
interpreter and float compiles), so the two paths check each other. Tensors the config leaves float
(`ignore`: lm_head, embeddings; the 3-D MoE expert banks, which are not Linear modules) are read as
they are stored; the `embed_scale` buffer a compressed Embedding also saves is skipped (transformers
does not load it; g4c derives it from the config).

Refused with one line (`CompressedTensorsError`, a `WeightError`) naming the tensor or the setting:
asymmetric schemes (zero points), bit widths other than 4 and 8, non-int types, strategies other than
`group` (channel, tensor, block, tensor_group), group sizes that are not a multiple of 32, activation or
KV-cache quantization, transforms (rotations), sparsity, non-trivial `weight_g_idx`, formats other than
pack-quantized and naive-quantized, a module stored with a float weight next to its scale (not
compressed), and shapes or dtypes that disagree with the config.

numpy + safetensors only: compiling such a checkpoint imports neither torch nor compressed-tensors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from g4c.errors import G4CError, WeightError
from g4c.quant import GROUP, as_words
from g4c.weights import Checkpoint, _st_dtype

QUANT_METHOD = "compressed-tensors"
FORMATS = ("pack-quantized", "naive-quantized")
INT_CODES = {"I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "U8": np.uint8}
SCALE_DTYPES = ("F32", "F16", "BF16")
# Tensors a quantized module stores beside (or instead of) its weight, and why g4c refuses some of them.
PARAMS = ("weight", "weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx",
          "weight_global_scale", "input_scale", "input_zero_point", "input_global_scale", "output_scale",
          "output_zero_point", "k_scale", "v_scale", "q_scale", "k_zero_point", "v_zero_point", "q_zero_point")
REFUSED_PARAMS = {
    "weight_zero_point": "asymmetric quantization (zero points)",
    "weight_global_scale": "a global scale (tensor-group strategy, NVFP4)",
    "input_scale": "activation quantization", "input_zero_point": "activation quantization",
    "input_global_scale": "activation quantization", "output_scale": "output quantization",
    "output_zero_point": "output quantization",
    "k_scale": "KV-cache quantization", "v_scale": "KV-cache quantization", "q_scale": "attention quantization",
    "k_zero_point": "KV-cache quantization", "v_zero_point": "KV-cache quantization",
    "q_zero_point": "attention quantization",
}
# The torch classes (MRO names) of the modules a config's class-name targets can match
LINEAR_CLASSES = ("Linear", "Module")
EMBEDDING_CLASSES = ("Gemma4TextScaledWordEmbedding", "Embedding", "Module")
EMBEDDINGS = ("embed_tokens", "embed_tokens_per_layer")
SUPPORTED = "g4c reads symmetric int4/int8 weights (w = q·scale) in groups of a multiple of 32"


class CompressedTensorsError(WeightError):
    """A compressed-tensors checkpoint g4c cannot compile as stored; the message is one line."""


def quantization_config(directory: str | Path) -> dict | None:
    """The `quantization_config` of a checkpoint directory's config.json (None without one)."""
    path = Path(directory) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise G4CError(f"{path}: cannot read the config ({exc})") from None
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    if qc is None and isinstance(raw, dict) and isinstance(raw.get("text_config"), dict):
        qc = raw["text_config"].get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise G4CError(f"{path}: quantization_config must be an object, not {type(qc).__name__}")
    return qc


class CompressedTensorsCheckpoint(Checkpoint):
    """A checkpoint directory in the compressed-tensors format (see the module docstring): the
    `WeightSource` of `Checkpoint` plus `quantized(name)` / `quantized_scheme(name)` as `GGUFWeights`
    offers them, so the compiler uses the stored blocks as they are."""

    def __init__(self, directory: str | Path, qconfig: dict | None = None):
        self.directory = Path(directory)
        self.qconfig = quantization_config(directory) if qconfig is None else qconfig
        self._where = f"{self.directory}/config.json: quantization_config"
        self._targets, self._ignore = self._check_config()
        self._quant: dict[str, dict[str, Any]] = {}  # canonical name → how it is stored (see _module)
        super().__init__(directory)

    # -- config -------------------------------------------------------------------------------------
    def _check_config(self) -> tuple[dict[str, tuple[str, dict]], list[str]]:
        """Settings that apply to the whole model; returns (target → (group name, scheme), ignore)."""
        qc, where = self.qconfig, self._where
        if qc.get("quant_method") != QUANT_METHOD:
            raise CompressedTensorsError(f"{where}.quant_method is {qc.get('quant_method')!r}, not {QUANT_METHOD!r}")
        if qc.get("kv_cache_scheme"):
            raise CompressedTensorsError(f"{where}.kv_cache_scheme is set: KV-cache quantization is not supported; "
                                         f"{SUPPORTED} and keeps the KV cache in float")
        transforms = qc.get("transform_config") or {}
        if isinstance(transforms, dict) and transforms.get("config_groups"):
            raise CompressedTensorsError(f"{where}.transform_config has transforms (rotations such as SpinQuant/"
                                         "QuIP), which g4c does not apply")
        sparsity = qc.get("sparsity_config") or {}
        if isinstance(sparsity, dict) and sparsity.get("format") not in (None, "dense"):
            raise CompressedTensorsError(f"{where}.sparsity_config has format {sparsity.get('format')!r}: sparse "
                                         "compressed weights are not supported")
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise CompressedTensorsError(f"{where}.config_groups is missing or empty")
        targets: dict[str, tuple[str, dict]] = {}
        for group, scheme in groups.items():
            if not isinstance(scheme, dict) or not isinstance(scheme.get("targets"), list):
                raise CompressedTensorsError(f"{where}.config_groups.{group} must be an object with a targets list")
            for target in scheme["targets"]:
                targets[str(target)] = (str(group), scheme)  # a later group's target overrides (as compressed-tensors)
        ignore = qc.get("ignore") or []
        if not isinstance(ignore, list):
            raise CompressedTensorsError(f"{where}.ignore must be a list")
        ignore = [str(i) for i in ignore]
        for target in [*targets, *ignore]:
            if target.startswith("re:"):
                try:
                    re.compile(target[3:])
                except re.error as exc:
                    raise CompressedTensorsError(f"{where}: target {target!r} is not a valid regex ({exc})") from None
        return targets, ignore

    def _group(self, module: str, classes: tuple[str, ...], honor_ignore: bool) -> tuple[str, dict] | None:
        """The config group that quantizes `module` (its full stored name), as compressed-tensors'
        `apply_quantization_config` picks it: not ignored, then the first matching target of exact
        names, regexes (sorted) and class names."""
        def name_match(target: str) -> bool:
            return re.match(target[3:], module) is not None if target.startswith("re:") else target == module

        if honor_ignore and any(name_match(t) or t in classes for t in self._ignore):
            return None
        ordered = sorted(self._targets, key=lambda t: ("re:" in t, t))
        matched = [t for t in ordered if name_match(t)] + [t for t in ordered if t in classes and not name_match(t)]
        return self._targets[matched[0]] if matched else None

    def _check_scheme(self, tensor: str, group: str, scheme: dict, stored_format: str) -> tuple[int, int]:
        """(bits, group size) of a group g4c can compile as stored; one line naming the setting otherwise."""
        at = f"{self._where}.config_groups.{group}"
        of = f"(tensor {tensor})"
        for kind in ("input_activations", "output_activations"):
            if scheme.get(kind):
                raise CompressedTensorsError(f"{at}.{kind} is set {of}: activation quantization is not supported; "
                                             f"{SUPPORTED} and keeps activations in float")
        fmt = scheme.get("format") or self.qconfig.get("format")
        if fmt not in (None, "mixed-precision") and fmt != stored_format:
            what = f"format {fmt!r}" if fmt not in FORMATS else f"format {fmt!r}, but the tensors are {stored_format}"
            raise CompressedTensorsError(f"{at} has {what} {of}: g4c reads the {' and '.join(FORMATS)} formats")
        args = scheme.get("weights")
        if not isinstance(args, dict):
            raise CompressedTensorsError(f"{at}.weights is missing {of}: the module is stored quantized without "
                                         "weight quantization settings")
        checks = (
            ("type", args.get("type", "int") == "int", "int"),
            ("num_bits", args.get("num_bits") in (4, 8), "4 or 8"),
            ("symmetric", args.get("symmetric", True) is True, "true (asymmetric, zero-point quantization is not "
                                                               "supported)"),
            ("strategy", args.get("strategy") == "group", "\"group\" (one scale per group of weights along K)"),
            ("dynamic", not args.get("dynamic"), "false"),
        )
        for field, ok, expected in checks:
            if not ok:
                raise CompressedTensorsError(f"{at}.weights.{field} is {json.dumps(args.get(field))} {of}, not "
                                             f"{expected}; {SUPPORTED}")
        size = args.get("group_size")
        if not isinstance(size, int) or size <= 0 or size % GROUP:
            raise CompressedTensorsError(f"{at}.weights.group_size is {json.dumps(size)} {of}, not a multiple of "
                                         f"{GROUP}; {SUPPORTED} (a larger group repeats its scale)")
        return int(args["num_bits"]), size

    # -- tensors ------------------------------------------------------------------------------------
    def _scan(self) -> str:
        stored, prefix = self._stored_tensors()
        text: dict[str, tuple[Path, str, tuple[int, ...], str]] = {}  # name below the prefix → stored tensor
        for key, (path, shape, code) in stored.items():
            name = key if key.startswith("lm_head.") else key[len(prefix):] if key.startswith(prefix) else None
            if name is not None:
                text[name] = (path, key, shape, code)
        modules: dict[str, dict[str, tuple[Path, str, tuple[int, ...], str]]] = {}
        for name in text:
            module, _, param = name.rpartition(".")
            if param in PARAMS and param != "weight" and module:
                modules.setdefault(module, {})
        for module, params in modules.items():
            for param in PARAMS:
                if f"{module}.{param}" in text:
                    params[param] = text.pop(f"{module}.{param}")
        for module in EMBEDDINGS:  # compressing an Embedding saves transformers' non-persistent buffer too
            if module in modules:
                text.pop(f"{module}.embed_scale", None)
        for name, (path, key, shape, code) in text.items():
            self._location[name] = (path, key)
            self._info[name] = (shape, _st_dtype(code, key))
            self._check_float(name, key, shape)
        for module, params in modules.items():
            self._module(module, params, prefix)
        return prefix

    def _check_float(self, name: str, key: str, shape: tuple[int, ...]) -> None:
        """A float matrix of a Linear/Embedding module that a config group quantizes: the checkpoint is
        not (fully) compressed, or the group quantizes activations; refused."""
        module, _, param = name.rpartition(".")
        if param != "weight" or len(shape) != 2:
            return
        classes = EMBEDDING_CLASSES if module in EMBEDDINGS else LINEAR_CLASSES
        found = self._group(key[: -len(".weight")], classes, honor_ignore=True)
        if found is None:
            return
        group, scheme = found
        if scheme.get("input_activations") or scheme.get("output_activations"):
            raise CompressedTensorsError(f"{self._where}.config_groups.{group} quantizes the activations of tensor "
                                         f"{key}: activation quantization is not supported; {SUPPORTED}")
        if scheme.get("weights"):
            raise self._refuse(key, f" is stored as float, but config.json's quantization_config.config_groups."
                                    f"{group} quantizes it: the checkpoint is not compressed (compress it with "
                                    "compressed-tensors' ModelCompressor, or list the module in ignore)")

    def _refuse(self, key: str, message: str) -> CompressedTensorsError:
        return CompressedTensorsError(f"{self.directory}: tensor {key}{message}")

    def _module(self, module: str, params: dict, prefix: str) -> None:
        """Check one quantized module's tensors against its config group; record how to read it."""
        full = module if module.startswith("lm_head") else prefix + module
        for param, why in REFUSED_PARAMS.items():
            if param in params:
                raise self._refuse(params[param][1], f": {why} is not supported; {SUPPORTED}")
        weight = params.get("weight")
        if "weight_packed" in params:
            stored_format, data = "pack-quantized", params["weight_packed"]
            if weight is not None:
                raise self._refuse(weight[1], f": module {full} stores both weight and weight_packed")
        elif weight is not None and weight[3] in INT_CODES:
            stored_format, data = "naive-quantized", weight
        elif weight is not None and weight[3] not in ("F32", "F16", "BF16", "F64"):
            raise self._refuse(weight[1], f" has dtype {weight[3]} (format {self.qconfig.get('format')!r}): not int "
                                          f"codes; {SUPPORTED}")
        elif weight is not None:
            status = self.qconfig.get("quantization_status")
            raise self._refuse(weight[1], " is stored as float next to its weight_scale: the checkpoint is not "
                                          f"compressed (quantization_status {status!r}); g4c reads compressed weights")
        else:
            raise self._refuse(next(iter(params.values()))[1], f": module {full} has quantization parameters but no "
                                                               "weight_packed or weight")
        tensor = data[1]
        if "weight_scale" not in params:
            raise self._refuse(tensor, f": its scales ({full}.weight_scale) are missing")
        found = self._group(full, EMBEDDING_CLASSES if module in EMBEDDINGS else LINEAR_CLASSES, honor_ignore=False)
        if found is None:
            raise self._refuse(tensor, " is stored quantized, but no entry of config.json's "
                                       "quantization_config.config_groups targets its module")
        bits, size = self._check_scheme(tensor, *found, stored_format)

        if stored_format == "pack-quantized":
            if "weight_shape" not in params:
                raise self._refuse(tensor, f": {full}.weight_shape is missing")
            path, key, shape, code = params["weight_shape"]
            if code not in INT_CODES or shape != (2,):
                raise self._refuse(key, f": expected 2 integers (rows, columns), got {code} {list(shape)}")
            rows, cols = (int(v) for v in self._open(path).get_tensor(key))
            words = cols * bits // 32
            if data[3] != "I32" or data[2] != (rows, words) or cols * bits % 32:
                raise self._refuse(tensor, f" is {data[3]} {list(data[2])}; for weight_shape [{rows}, {cols}] and "
                                           f"{bits}-bit codes g4c expects I32 [{rows}, {words}]")
        else:
            if len(data[2]) != 2 or data[3] != "I8":
                raise self._refuse(tensor, f" is {data[3]} {list(data[2])}; naive-quantized codes must be I8 "
                                           "[rows, columns]")
            rows, cols = data[2]
        _, skey, sshape, scode = params["weight_scale"]
        if cols % size:
            raise self._refuse(tensor, f": {cols} columns are not a whole number of groups of {size}")
        if scode not in SCALE_DTYPES or sshape != (rows, cols // size):
            raise self._refuse(skey, f" is {scode} {list(sshape)}; g4c expects F32, F16 or BF16 "
                                     f"[{rows}, {cols // size}] (group size {size})")
        if "weight_g_idx" in params:  # GPTQ's activation order: only the identity grouping is a plain group layout
            path, key, shape, _ = params["weight_g_idx"]
            g_idx = np.asarray(self._open(path).get_tensor(key))
            if shape != (cols,) or not np.array_equal(g_idx, np.arange(cols) // size):
                raise self._refuse(key, ": columns are grouped out of order (GPTQ activation order); g4c needs "
                                        "groups of consecutive columns")
        name = f"{module}.weight"
        self._quant[name] = {"scheme": "q4" if bits == 4 else "q8", "bits": bits, "group": size,
                             "format": stored_format, "data": data[:2], "scale": params["weight_scale"][:2]}
        self._info[name] = ((rows, cols), "float32")
        self._location.pop(name, None)

    # -- reading ------------------------------------------------------------------------------------
    def _read(self, where: tuple[Path, str], rows: np.ndarray | None) -> np.ndarray:
        path, key = where
        if rows is None:
            return np.asarray(self._open(path).get_tensor(key))
        view = self._open(path).get_slice(key)
        return np.concatenate([view[int(i): int(i) + 1] for i in rows], axis=0)

    def _codes(self, name: str, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(codes int8 [N, K], scales float32 [N, K/32]) of a quantized tensor (or of its `rows`)."""
        spec = self._quant[name]
        data = self._read(spec["data"], rows)
        if spec["format"] == "pack-quantized":
            raw = np.ascontiguousarray(data.astype("<i4", copy=False)).view(np.uint8)  # little-endian bytes
            if spec["bits"] == 4:  # byte j: code 2j in the low nibble, 2j+1 in the high one; nibble = q + 8
                nibbles = np.stack([raw & 15, raw >> 4], axis=-1).reshape(raw.shape[0], -1)
                codes = nibbles.astype(np.int8) - np.int8(8)
            else:  # byte i: code i + 128
                codes = (raw ^ np.uint8(0x80)).view(np.int8)
        else:
            codes = np.asarray(data, dtype=np.int8)
            low, high = -(1 << (spec["bits"] - 1)), (1 << (spec["bits"] - 1)) - 1
            if spec["bits"] == 4 and codes.size and (codes.min() < low or codes.max() > high):
                raise self._refuse(spec["data"][1], f": codes outside [{low}, {high}] for 4 bits")
        return codes, self._scales(spec, rows)

    def _scales(self, spec: dict, rows: np.ndarray | None) -> np.ndarray:
        """float32 [N, K/32] (exact: fp32, bf16 and fp16 values are float32 values), each scale of a
        group of G = 32·r weights repeated r times."""
        scales = np.asarray(self._read(spec["scale"], rows), dtype=np.float32)
        if not np.isfinite(scales).all():
            raise self._refuse(spec["scale"][1], " has NaN or infinite scales: the weights are corrupt")
        return np.repeat(scales, spec["group"] // GROUP, axis=-1)

    def _dequantized(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        codes, scales = self._codes(name, rows)
        groups = codes.astype(np.float32).reshape(codes.shape[0], -1, GROUP)
        return (groups * scales[..., None]).reshape(codes.shape)

    def names(self) -> list[str]:
        return [*self._location, *self._quant]

    def get(self, name: str) -> np.ndarray:
        if name in self._quant:
            return self._dequantized(name)
        return super().get(name)

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        if name in self._quant:
            return self._dequantized(name, np.asarray(ids, dtype=np.int64))
        return super().rows(name, ids)

    def quantized_scheme(self, name: str) -> str | None:
        spec = self._quant.get(name)
        return None if spec is None else spec["scheme"]

    def quantized(self, name: str) -> tuple[str, np.ndarray, np.ndarray] | None:
        """("q4"|"q8", data uint32 [N, K·bits/32], scales float32 [N, K/32]) of a tensor stored
        quantized: its codes repacked into g4c.quant's layout (same values), each scale repeated for the
        32-wide groups of its group; None for tensors stored as floats."""
        spec = self._quant.get(name)
        if spec is None:
            return None
        if spec["format"] != "pack-quantized" or spec["bits"] != 4:  # int8 (or int4 stored as int8): the codes
            codes, scales = self._codes(name)
            if spec["bits"] == 8:  # q8: code e of a group in byte e, two's complement
                return spec["scheme"], as_words(codes.view(np.uint8), "uint32"), scales
            nibbles = (codes.view(np.uint8) + np.uint8(8)).reshape(codes.shape[0], -1, GROUP)
            data = nibbles[..., :16] | (nibbles[..., 16:] << 4)  # Q4_0: byte b = code b | code b + 16 << 4
            return spec["scheme"], as_words(data.reshape(codes.shape[0], -1), "uint32"), scales
        # pack-quantized int4, nibble by nibble without unpacking: a group's 16 bytes hold codes 2j (low)
        # and 2j + 1 (high) in byte j, so its first 8 bytes (a) hold codes 0..15 and its last 8 (b) codes
        # 16..31; Q4_0's byte 2j is then a[j]'s low nibble | b[j]'s low nibble << 4, byte 2j + 1 a[j]'s
        # high nibble | b[j]'s high nibble (the nibbles are q + 8 in both layouts)
        raw = self._read(spec["data"], None)
        raw = np.ascontiguousarray(raw.astype("<i4", copy=False)).view(np.uint8)
        rows = raw.shape[0]
        groups = raw.reshape(rows, -1, 2, 8)
        a, b = groups[..., 0, :], groups[..., 1, :]
        data = np.stack([(a & 15) | (b << 4), (a >> 4) | (b & 0xF0)], axis=-1)
        return spec["scheme"], as_words(data.reshape(rows, -1), "uint32"), self._scales(spec, None)

    def stored_format(self, name: str) -> str | None:
        """How a tensor is stored: `pack-quantized int4 (group 128)` etc., None for floats."""
        spec = self._quant.get(name)
        return None if spec is None else f"{spec['format']} int{spec['bits']} (group {spec['group']})"


__all__ = ["QUANT_METHOD", "CompressedTensorsCheckpoint", "CompressedTensorsError", "quantization_config"]
