"""Typed Gemma 4 text-decoder configuration, read from a Hugging Face `config.json`.

`ModelConfig` mirrors transformers' `Gemma4TextConfig` (field names are the HF keys, so a config.json
maps onto it one to one) and resolves everything the compiler needs per layer into `LayerSpec`s:
attention kind, head_dim, KV-head count, RoPE, window, KV-sharing role and donor, MLP width.

Accepted inputs (all spellings transformers >= 5.5 accepts):
- `Gemma4TextConfig` (`model_type` `gemma4_text`) or `Gemma4Config` with a `text_config` inside
  (`gemma4`); the 12B `gemma4_unified` / `gemma4_unified_text` (same decoder, no PLE, no MoE);
- global-layer settings as `per_layer_config` ({layer index: {head_dim, num_key_value_heads}}, as
  `save_pretrained` writes it) or as `global_head_dim` / `num_global_key_value_heads` (published
  checkpoints). Like transformers, `num_global_key_value_heads` only applies when `attention_k_eq_v`.

Every inconsistency raises `ConfigError` with one line naming the field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from g4c.errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)
TEXT_MODEL_TYPES = {"gemma4_text": "gemma4", "gemma4_unified_text": "gemma4_unified"}
WRAPPER_MODEL_TYPES = {"gemma4": "gemma4_text", "gemma4_unified": "gemma4_unified_text"}
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh",)
PER_LAYER_OVERRIDE_KEYS = ("head_dim", "num_key_value_heads")
KVMode = Literal["store", "reuse"] | None


@dataclass(frozen=True)
class RopeSpec:
    """RoPE for one layer type: `default` rotates every pair, `proportional` only the first
    `int(partial_rotary_factor * head_dim / 2)` pairs (the rest get frequency 0); both pair dim i
    with dim i + head_dim/2 (`rotate_half`)."""

    rope_type: Literal["default", "proportional"]
    theta: float
    partial_rotary_factor: float = 1.0

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies [head_dim/2] in float32, computed as transformers does."""
        half = head_dim // 2
        pairs = half if self.rope_type == "default" else int(self.partial_rotary_factor * head_dim // 2)
        exponents = np.arange(0, 2 * pairs, 2, dtype=np.float32) / np.float32(head_dim)
        rotated = (np.float32(1.0) / (np.float32(self.theta) ** exponents)).astype(np.float32)
        return np.concatenate([rotated, np.zeros(half - pairs, dtype=np.float32)])

    def rotated_pairs(self, head_dim: int) -> int:
        return int(np.count_nonzero(self.inv_freq(head_dim)))


@dataclass(frozen=True)
class LayerSpec:
    """Everything one decoder layer needs, resolved from the config."""

    index: int
    layer_type: str  # sliding_attention | full_attention
    head_dim: int
    num_kv_heads: int
    rope: RopeSpec
    window: int | None  # sliding layers: keys older than `window` positions are masked
    kv_mode: KVMode  # None: own cache; "store": own cache, donor for shared layers; "reuse": no cache
    kv_source: int  # layer whose K/V this layer attends to (itself unless kv_mode == "reuse")
    k_eq_v: bool  # full layer without v_proj: v comes from the raw k projection
    mlp_intermediate: int

    @property
    def is_sliding(self) -> bool:
        return self.layer_type == SLIDING

    @property
    def kind(self) -> str:
        return "sliding" if self.is_sliding else "global"


def _default_rope_parameters() -> dict[str, dict[str, Any]]:
    return {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }


@dataclass
class ModelConfig:
    """The Gemma 4 text decoder's hyper-parameters (HF key names) plus resolved per-layer specs."""

    vocab_size: int = 262_144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2
    tie_word_embeddings: bool = True
    rope_parameters: dict[str, dict[str, Any]] = field(default_factory=_default_rope_parameters)
    attention_bias: bool = False
    sliding_window: int = 512
    layer_types: list[str] | None = None
    final_logit_softcapping: float | None = None
    use_bidirectional_attention: str | None = None
    vocab_size_per_layer_input: int = 262_144
    hidden_size_per_layer_input: int = 256
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    enable_moe_block: bool = False
    use_double_wide_mlp: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    per_layer_config: dict[int, dict[str, int]] = field(default_factory=dict)
    model_type: str = "gemma4_text"
    dtype: str = "float32"
    layers: tuple[LayerSpec, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_limits({name: getattr(self, name) for name in LIMITS})  # before lists of num_hidden_layers entries
        if self.layer_types is None:  # transformers' default: every 6th layer full (5:1)
            self.layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        self.per_layer_config = {int(k): dict(v) for k, v in self.per_layer_config.items()}
        _validate(self)
        self.layers = tuple(_resolve_layer(self, i) for i in range(self.num_hidden_layers))

    # ---- derived facts the frontend and the tools use -------------------------------------------
    @property
    def family(self) -> str:
        """`gemma4` or `gemma4_unified` (the 12B)."""
        return TEXT_MODEL_TYPES[self.model_type]

    @property
    def has_ple(self) -> bool:
        return self.hidden_size_per_layer_input > 0

    @property
    def input_vocab_size(self) -> int:
        """Token ids must be below this: both the embedding and the PLE table are indexed by them."""
        return min(self.vocab_size, self.vocab_size_per_layer_input) if self.has_ple else self.vocab_size

    @property
    def kv_sharing_modes(self) -> list[KVMode]:
        """Same rule as transformers: the last `num_kv_shared_layers` layers "reuse"; the last
        earlier layer of each type "store"s (is the donor), even when no layer reuses it (transformers
        ≥ 5.24: assistant models read those states); "store" computes exactly what None does."""
        n, shared = self.num_hidden_layers, self.num_kv_shared_layers
        if shared == n:
            return ["reuse"] * n
        first_shared = n - shared
        modes: list[KVMode] = [None if i < first_shared else "reuse" for i in range(n)]
        for layer_type in set(self.layer_types):
            modes[_last_index(self.layer_types[:first_shared], layer_type)] = "store"
        return modes

    def to_hf_dict(self) -> dict[str, Any]:
        """A `config.json` for transformers (text-only `Gemma4ForCausalLM` / unified equivalent).

        Global layers are written with `per_layer_config`, as `save_pretrained` does."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        out["per_layer_config"] = {str(k): v for k, v in sorted(self.per_layer_config.items())}
        arch = "Gemma4ForCausalLM" if self.family == "gemma4" else "Gemma4UnifiedForCausalLM"
        out["architectures"] = [arch]
        if self.family == "gemma4_unified":
            for key in ("vocab_size_per_layer_input", "hidden_size_per_layer_input", "enable_moe_block",
                        "num_experts", "top_k_experts", "moe_intermediate_size"):
                out.pop(key)
        return out

    def with_layers(self, num_layers: int) -> "ModelConfig":
        """The same model cut to `num_layers` layers: keeps the sliding:full pattern (last layer
        full) and a proportional KV-shared tail that still has a donor of every type."""
        if not 1 <= num_layers <= self.num_hidden_layers:
            raise ConfigError(f"--layers must be in 1..{self.num_hidden_layers}, got {num_layers}")
        types = self.layer_types[:num_layers]
        types[-1] = FULL
        shared = round(self.num_kv_shared_layers * num_layers / self.num_hidden_layers)
        while shared and set(types[: num_layers - shared]) != set(types):
            shared -= 1
        overrides = {i: v for i, v in self.per_layer_config.items() if i < num_layers}
        for i, t in enumerate(types):  # the forced-full last layer needs the global overrides too
            if t == FULL and i not in overrides and self.per_layer_config:
                overrides[i] = next(iter(self.per_layer_config.values()))
        return dataclasses.replace(self, num_hidden_layers=num_layers, layer_types=types,
                                   num_kv_shared_layers=shared, per_layer_config=overrides)



def _last_index(items: list[str], value: str) -> int:
    return len(items) - 1 - items[::-1].index(value)


def _resolve_layer(cfg: ModelConfig, i: int) -> LayerSpec:
    layer_type = cfg.layer_types[i]
    override = cfg.per_layer_config.get(i, {})
    mode = cfg.kv_sharing_modes[i]
    source = i
    if mode == "reuse":
        source = _last_index(cfg.layer_types[: cfg.num_hidden_layers - cfg.num_kv_shared_layers], layer_type)
    rope = cfg.rope_parameters[layer_type]
    double = cfg.use_double_wide_mlp and mode == "reuse"
    return LayerSpec(
        index=i,
        layer_type=layer_type,
        head_dim=override.get("head_dim", cfg.head_dim),
        num_kv_heads=override.get("num_key_value_heads", cfg.num_key_value_heads),
        rope=RopeSpec(rope["rope_type"], float(rope["rope_theta"]), float(rope.get("partial_rotary_factor", 1.0))),
        window=cfg.sliding_window if layer_type == SLIDING else None,
        kv_mode=mode,
        kv_source=source,
        k_eq_v=cfg.attention_k_eq_v and layer_type == FULL,
        mlp_intermediate=cfg.intermediate_size * (2 if double else 1),
    )


# ---- validation --------------------------------------------------------------------------------
# Upper limits of the dimensions that size the weights (and of the layer count, which sizes lists built
# from the config): far above every Gemma 4 model (the largest: vocab 262144, hidden 5376, intermediate
# 21504, head_dim 512, 60 layers, 32 heads, 128 experts) and low enough that a typo (vocab_size 10**12)
# is refused when the config is read, by every command, instead of as a MemoryError minutes later.
# Within them a model can still be too big for a machine: `g4c init-random` checks its tensors against
# this machine's memory and disk (g4c/checkpoint.py).
LIMITS: dict[str, int] = {
    "vocab_size": 2**24, "vocab_size_per_layer_input": 2**24,
    "hidden_size": 2**16, "hidden_size_per_layer_input": 2**16, "head_dim": 2**16,
    "intermediate_size": 2**18, "moe_intermediate_size": 2**18,
    "num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024, "num_experts": 2**12,
}


def check_limits(values: dict[str, Any]) -> None:
    """Refuse a dimension above `LIMITS` (values of other types are left to the full validation)."""
    for name, limit in LIMITS.items():
        value = values.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            raise ConfigError(f"{name}: {value} is larger than g4c supports "
                              f"(at most {limit} = 2^{limit.bit_length() - 1})")


_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")


def _validate(cfg: ModelConfig) -> None:
    if cfg.model_type not in TEXT_MODEL_TYPES:
        raise ConfigError(f"model_type: expected one of {sorted(TEXT_MODEL_TYPES)}, got {cfg.model_type!r}")
    for name in _INT_FIELDS:
        _require_int(name, getattr(cfg, name), minimum=1)
    for name in ("hidden_size_per_layer_input", "vocab_size_per_layer_input", "num_kv_shared_layers"):
        _require_int(name, getattr(cfg, name), minimum=0)
    if not (isinstance(cfg.rms_norm_eps, (int, float)) and cfg.rms_norm_eps > 0):
        raise ConfigError(f"rms_norm_eps: must be a positive number, got {cfg.rms_norm_eps!r}")
    if cfg.final_logit_softcapping is not None and not cfg.final_logit_softcapping > 0:
        raise ConfigError(f"final_logit_softcapping: must be positive or null, got {cfg.final_logit_softcapping!r}")
    if cfg.hidden_activation not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"hidden_activation: only {SUPPORTED_ACTIVATIONS} is supported, got {cfg.hidden_activation!r}")
    if cfg.attention_bias:
        raise ConfigError("attention_bias: Gemma 4 has no attention biases; true is not supported")
    if cfg.use_bidirectional_attention == "all":
        raise ConfigError("use_bidirectional_attention: 'all' (embedding models) is not supported; use null or 'vision'")
    _validate_layer_types(cfg)
    _validate_per_layer_config(cfg)
    _validate_heads(cfg)
    _validate_rope(cfg)
    _validate_sharing(cfg)
    _validate_moe(cfg)
    if cfg.has_ple and cfg.vocab_size_per_layer_input < 1:
        raise ConfigError("vocab_size_per_layer_input: must be >= 1 when hidden_size_per_layer_input > 0")


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name}: must be >= {minimum}, got {value}")


def _validate_layer_types(cfg: ModelConfig) -> None:
    types = cfg.layer_types
    if len(types) != cfg.num_hidden_layers:
        raise ConfigError(f"layer_types: has {len(types)} entries but num_hidden_layers is {cfg.num_hidden_layers}")
    bad = [t for t in types if t not in LAYER_TYPES]
    if bad:
        raise ConfigError(f"layer_types: unknown layer type {bad[0]!r} (expected {' or '.join(LAYER_TYPES)})")
    if types[-1] != FULL:
        raise ConfigError("layer_types: the last layer must be 'full_attention'")


def _validate_per_layer_config(cfg: ModelConfig) -> None:
    for index, override in cfg.per_layer_config.items():
        if not 0 <= index < cfg.num_hidden_layers:
            raise ConfigError(f"per_layer_config: layer index {index} is outside 0..{cfg.num_hidden_layers - 1}")
        for key, value in override.items():
            if key not in PER_LAYER_OVERRIDE_KEYS:
                raise ConfigError(f"per_layer_config.{index}.{key}: unsupported override (supported: "
                                  f"{', '.join(PER_LAYER_OVERRIDE_KEYS)})")
            _require_int(f"per_layer_config.{index}.{key}", value, minimum=1)
            limit = LIMITS[key]
            if value > limit:
                raise ConfigError(f"per_layer_config.{index}.{key}: {value} is larger than g4c supports "
                                  f"(at most {limit} = 2^{limit.bit_length() - 1})")


def _validate_heads(cfg: ModelConfig) -> None:
    for i in range(cfg.num_hidden_layers):
        override = cfg.per_layer_config.get(i, {})
        kv = override.get("num_key_value_heads", cfg.num_key_value_heads)
        head_dim = override.get("head_dim", cfg.head_dim)
        where = f"per_layer_config.{i}.num_key_value_heads" if "num_key_value_heads" in override else "num_key_value_heads"
        if cfg.num_attention_heads % kv:
            raise ConfigError(f"{where}: num_attention_heads ({cfg.num_attention_heads}) is not a multiple of {kv}")
        if head_dim % 2:
            raise ConfigError(f"head_dim: must be even for RoPE, got {head_dim} on layer {i}")


def _validate_rope(cfg: ModelConfig) -> None:
    for layer_type in set(cfg.layer_types):
        params = cfg.rope_parameters.get(layer_type) if isinstance(cfg.rope_parameters, dict) else None
        if not isinstance(params, dict):
            raise ConfigError(f"rope_parameters.{layer_type}: missing (needed by a layer of that type)")
        kind = params.get("rope_type")
        if kind not in ("default", "proportional"):
            raise ConfigError(f"rope_parameters.{layer_type}.rope_type: expected 'default' or 'proportional', got {kind!r}")
        theta = params.get("rope_theta")
        if not isinstance(theta, (int, float)) or theta <= 0:
            raise ConfigError(f"rope_parameters.{layer_type}.rope_theta: must be a positive number, got {theta!r}")
        factor = params.get("partial_rotary_factor", 1.0)
        if not isinstance(factor, (int, float)) or not 0 < factor <= 1:
            raise ConfigError(f"rope_parameters.{layer_type}.partial_rotary_factor: must be in (0, 1], got {factor!r}")
        if params.get("factor", 1.0) != 1.0:
            raise ConfigError(f"rope_parameters.{layer_type}.factor: RoPE scaling factors are not supported")


def _validate_sharing(cfg: ModelConfig) -> None:
    shared = cfg.num_kv_shared_layers
    if shared >= cfg.num_hidden_layers:
        raise ConfigError(f"num_kv_shared_layers: {shared} leaves no layer to produce K/V "
                          f"(num_hidden_layers is {cfg.num_hidden_layers})")
    if shared and set(cfg.layer_types[: cfg.num_hidden_layers - shared]) != set(cfg.layer_types):
        raise ConfigError("num_kv_shared_layers: a shared layer type has no earlier non-shared layer of the same "
                          "type to take K/V from")
    if cfg.use_double_wide_mlp and not isinstance(cfg.use_double_wide_mlp, bool):
        raise ConfigError("use_double_wide_mlp: expected true or false")


def _validate_moe(cfg: ModelConfig) -> None:
    if not cfg.enable_moe_block:
        return
    for name in ("num_experts", "top_k_experts", "moe_intermediate_size"):
        _require_int(name, getattr(cfg, name), minimum=1)
    if cfg.top_k_experts > cfg.num_experts:
        raise ConfigError(f"top_k_experts: {cfg.top_k_experts} exceeds num_experts ({cfg.num_experts})")


# ---- reading config.json -----------------------------------------------------------------------
def config_from_dict(raw: dict[str, Any], source: str = "config") -> ModelConfig:
    """Build a `ModelConfig` from a parsed HF config dict (text or multimodal wrapper)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    model_type = raw.get("model_type")
    if model_type in WRAPPER_MODEL_TYPES:
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"text_config: {model_type!r} config in {source} has no text_config object")
        text = dict(text)
        inner = text.setdefault("model_type", WRAPPER_MODEL_TYPES[model_type])
        if inner != WRAPPER_MODEL_TYPES[model_type]:
            raise ConfigError(f"text_config.model_type: {inner!r} inside a {model_type!r} config "
                              f"(expected {WRAPPER_MODEL_TYPES[model_type]!r})")
        if "tie_word_embeddings" in raw:
            text.setdefault("tie_word_embeddings", raw["tie_word_embeddings"])
        raw = text
        model_type = raw["model_type"]
    if model_type not in TEXT_MODEL_TYPES:
        raise ConfigError(f"model_type: {source} is {model_type!r}, not a Gemma 4 config "
                          f"(expected one of {sorted(TEXT_MODEL_TYPES) + sorted(WRAPPER_MODEL_TYPES)})")
    known = {f.name for f in dataclasses.fields(ModelConfig) if f.init}
    kwargs = {k: v for k, v in raw.items() if k in known}
    check_limits(kwargs)  # before lists of num_hidden_layers entries are built
    if "torch_dtype" in raw and "dtype" not in raw:
        kwargs["dtype"] = raw["torch_dtype"]
    kwargs["per_layer_config"] = _global_layer_overrides(raw)
    if TEXT_MODEL_TYPES[model_type] == "gemma4_unified":  # the 12B decoder has neither PLE nor MoE
        kwargs.update(hidden_size_per_layer_input=0, enable_moe_block=False)
    try:
        return ModelConfig(**kwargs)
    except TypeError as exc:  # e.g. layer_types not a list
        raise ConfigError(f"{source}: {exc}") from None


def _global_layer_overrides(raw: dict[str, Any]) -> dict[int, dict[str, int]]:
    """Resolve both spellings of the global-layer settings into {layer index: overrides}."""
    if "per_layer_config" in raw and raw["per_layer_config"] is not None:
        plc = raw["per_layer_config"]
        if not isinstance(plc, dict):
            raise ConfigError("per_layer_config: expected an object {layer index: overrides}")
        return _per_layer_entries(plc, raw)
    layer_types = raw.get("layer_types")
    if not isinstance(layer_types, list):
        n = raw.get("num_hidden_layers", 30)
        layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(n if isinstance(n, int) else 0)]
        if layer_types:
            layer_types[-1] = FULL
    override: dict[str, int] = {"head_dim": raw.get("global_head_dim", 512)}
    global_kv = raw.get("num_global_key_value_heads")
    if raw.get("attention_k_eq_v", False) and global_kv is not None:
        override["num_key_value_heads"] = global_kv
    return {i: dict(override) for i, t in enumerate(layer_types) if t == FULL}


def _per_layer_entries(plc: dict[str, Any], raw: dict[str, Any]) -> dict[int, dict[str, int]]:
    out: dict[int, dict[str, int]] = {}
    layer_types = raw.get("layer_types") or []
    for key, value in plc.items():
        if not isinstance(value, dict):
            raise ConfigError(f"per_layer_config.{key}: expected an object of overrides")
        if key in LAYER_TYPES:  # keyed by layer type: applies to every layer of that type
            for i, t in enumerate(layer_types):
                if t == key:
                    out.setdefault(i, {}).update(value)
            continue
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise ConfigError(f"per_layer_config: key {key!r} is neither a layer index nor a layer type") from None
        out.setdefault(index, {}).update(value)
    return out


def load_config(path: str | Path) -> ModelConfig:
    """Read `config.json` (or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ConfigError(f"config.json not found at {path}")
    if not path.is_file():  # a FIFO would block the read, a device never end it
        raise ConfigError(f"{path}: not a regular file")
    try:
        raw = json.loads(path.read_text())
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    return config_from_dict(raw, source=str(path))


