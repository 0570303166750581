"""The artifact manifest (`manifest.json`): one dataclass, written by the compiler, read by every runtime.

The format is documented in docs/artifact-format.md. Versioning rule: `FORMAT_VERSION` changes
whenever a field is added, removed or changes meaning; a runtime reads exactly its own version and
refuses others with "recompile it" (artifacts are cheap to rebuild, silent misreads are not).

Programs are the kernel-call sequences of the entry functions (`prefill`, `prefill_all`, `decode`).
Buffer references in a step's args: `in:ids`, `in:positions` (runtime inputs), `w:NAME` (weights),
`a:NAME` (activations, shapes in `Program.buffers`, "T" = the token count), `kv:SLOT` (a KV cache);
three steps are not kernels: `rows` (PLE rows gathered by the runtime from a host table), `last`
(the last n rows) and `reshape`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from g4c import __version__
from g4c.artifact.tensors import ArtifactError, sha256_file

FORMAT = "g4c-artifact"
FORMAT_VERSION = 5  # 5: media (encoders, media prefill, program inputs); 4: tuned_kernels; 3: typed manifest (kernel specs, executor requirements); 2: Relax VM entry functions
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
HOST = "host.safetensors"

Shape = list  # of int | str ("T")


@dataclass
class Step:
    kernel: str  # kernel name (a key of Manifest.kernels), or a runtime step: "rows" | "last" | "reshape"
    args: list[str]  # buffer references: inputs then outputs
    attrs: dict = field(default_factory=dict)


@dataclass
class Program:
    name: str
    steps: list[Step] = field(default_factory=list)
    buffers: dict[str, tuple[Shape, str]] = field(default_factory=dict)  # activation → (shape, dtype)
    outputs: dict[str, str] = field(default_factory=dict)
    # the runtime inputs [name, shape, dtype] of a program that takes more than ids and positions (a
    # media prefill, an encoder); empty: ids, positions (and the PLE rows)
    inputs: list[tuple[str, Shape, str]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"name": self.name, "steps": [asdict(s) for s in self.steps],
                "buffers": {k: [list(v[0]), v[1]] for k, v in self.buffers.items()}, "outputs": self.outputs,
                "inputs": [[n, list(shape), dtype] for n, shape, dtype in self.inputs]}

    @classmethod
    def from_json(cls, data: dict) -> Program:
        return cls(data["name"], [Step(**s) for s in data["steps"]],
                   {k: (list(v[0]), v[1]) for k, v in data["buffers"].items()}, dict(data["outputs"]),
                   [(n, list(shape), dtype) for n, shape, dtype in data.get("inputs", [])])

    @property
    def input_names(self) -> list[str]:
        return [n for n, _, _ in self.inputs] or ["ids", "positions"]

    def ple_width(self) -> int | None:
        """Width of the PLE rows the runtime gathers for this program (None: no PLE)."""
        rows = next((s for s in self.steps if s.kernel == "rows"), None)
        return None if rows is None else int(self.buffers[rows.args[1][2:]][0][1])


@dataclass
class KVSlot:
    slot: str
    layer: int
    kv_heads: int
    head_dim: int
    ring: bool  # a sliding layer's ring buffer; else a full-length cache
    window: int | None

    def capacity(self, max_context: int, prefill_chunk: int) -> int:
        """Rows to allocate: a ring holds the window plus one chunk's new keys minus one (a chunk's
        queries still see the window before them), a full cache every position."""
        return self.window + prefill_chunk - 1 if self.ring else max_context


@dataclass
class EntrySignature:
    """Parameter order of every entry function (what a runtime passes)."""

    inputs: list[str]  # "ids", "positions"(, "ple_rows")
    weights: list[str]
    caches: list[str]


@dataclass
class Manifest:
    target: str  # the target name, e.g. "llvm", "cuda:sm_90"
    target_spec: str  # the TVM target, as JSON
    config: dict  # the model's Hugging Face config
    # how the artifact runs: its executor, the library that executor loads, where the kernels run
    runtime: str  # "relax-vm" (TVM's Relax VM through tvm_ffi) or "wgpu" (WGSL kernels through wgpu)
    library: str  # file the executor loads
    entry: EntrySignature
    kernels: dict[str, dict]  # kernel name → its spec (op, variant, static parameters)
    programs: dict[str, Program]
    kv_slots: dict[str, KVSlot]
    device: str = "cpu"  # tvm_ffi device name of the kernels ("cpu", "cuda", "metal", ...)
    device_type: int = 1  # its DLPack device type
    runtime_libraries: list[str] = field(default_factory=list)  # TVM runtime libraries to load first
    machines: list[str] = field(default_factory=list)  # platform.machine() values the code runs on ([]: any)
    system: str | None = None  # platform.system() the code needs (None: any)
    platform: str | None = None  # how messages describe where it runs (e.g. "macOS, Metal")
    prepare: str | None = None  # what to do on the device before the library exists (e.g. link it)
    static_decode: bool = False  # decode takes fixed tensors: one token, whole caches
    index_dtype: str = "int64"  # ids, positions and indices
    weight_dtype: str = "float32"  # storage of the tensors in `weight_dtype_tensors`; the rest is fp32
    weight_dtype_tensors: list[str] = field(default_factory=list)
    weight_recipes: dict[str, dict] = field(default_factory=dict)  # g4c.artifact.recipes
    host_tables: list[str] = field(default_factory=list)  # tables gathered row by row on the host (PLE)
    quant: str | None = None  # group quantization of the linear/expert/embedding matrices (g4c.quant), or none
    host_quant: str | None = None  # ... of the host tables
    # checkpoint tensors stored in a type g4c has no kernels for (a GGUF file's K-quants): name → {"stored":
    # its type, "as": what the artifact holds (float32 or a scheme), "max_abs_error": what that added}
    converted_tensors: dict[str, dict] = field(default_factory=dict)
    kv_plan: list = field(default_factory=list)  # plan_kv_cache's per-layer plan, for inspection
    launches: dict[str, list[dict]] | None = None  # wgpu: per kernel, its device launches (codegen.wgsl)
    decode_graph: dict[str, int] | None = None  # CUDA graphs: kernels captured / launched outside
    weights_from_seed: dict | None = None  # {"seed", "dtype"}: weights regenerated at load time
    tuned_kernels: dict[str, dict] = field(default_factory=dict)  # kernel → {"space", "knobs", "speedup"} from a tuning DB
    # images/audio (g4c.runtime.media.MediaSpec as JSON: processor config, special tokens, pad id, mask rule,
    # towers): the artifact has the encode_image/encode_audio and prefill(_all)_media programs; None: text only
    media: dict | None = None
    build_seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)  # file name → SHA-256
    tvm_version: str = ""
    g4c_version: str = __version__
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    # -- JSON ------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        data = asdict(self)
        data["programs"] = {k: p.to_json() for k, p in self.programs.items()}
        return data

    @classmethod
    def from_json(cls, data: dict, source: str = MANIFEST) -> Manifest:
        """Validate and type a manifest read from JSON: format and version first, then every field."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ArtifactError(f"{source}: not a {FORMAT} manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"artifact format v{data.get('format_version')} is not the v{FORMAT_VERSION} this "
                                "g4c reads: recompile it")
        if data.get("g4c_version") != __version__:
            raise ArtifactError(f"artifact was compiled by g4c {data.get('g4c_version')}, this is g4c {__version__}: "
                                "recompile it")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ArtifactError(f"{source}: unknown field {unknown[0]!r}")
        try:
            values = dict(data)
            values["entry"] = EntrySignature(**data["entry"])
            values["programs"] = {k: Program.from_json(p) for k, p in data["programs"].items()}
            values["kv_slots"] = {k: KVSlot(**v) for k, v in data["kv_slots"].items()}
            manifest = cls(**values)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise ArtifactError(f"{source}: malformed manifest ({type(exc).__name__}: {exc})") from None
        try:
            manifest.validate()
        except _Invalid as exc:
            raise ArtifactError(f"{source}: invalid manifest: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:  # a value of the wrong kind
            raise ArtifactError(f"{source}: malformed manifest ({type(exc).__name__}: {exc})") from None
        return manifest

    def validate(self) -> None:
        """Every value a runtime trusts, checked: types and ranges, file references that are plain
        names inside the artifact, required files hashed, programs that reference only declared
        kernels, weights, caches and buffers. (Sizes are checked against the tensors at load time.)"""
        for name in ("target", "target_spec", "runtime", "library", "device", "tvm_version"):
            _check(isinstance(getattr(self, name), str), f"{name} must be a string")
        _check(self.index_dtype in INDEX_DTYPES, f"index_dtype must be one of {INDEX_DTYPES}")
        _check(self.weight_dtype in WEIGHT_DTYPES, f"weight_dtype must be one of {WEIGHT_DTYPES}")
        _check(_is_int(self.device_type) and self.device_type >= 0, "device_type must be a non-negative integer")
        _check(isinstance(self.static_decode, bool), "static_decode must be true or false")
        for name in ("system", "platform", "prepare"):
            _check(getattr(self, name) is None or isinstance(getattr(self, name), str), f"{name} must be a string")
        for name in ("runtime_libraries", "machines", "weight_dtype_tensors", "host_tables"):
            _check(_strings(getattr(self, name)), f"{name} must be a list of strings")
        for name in ("config", "weight_recipes", "kernels", "files", "converted_tensors", "tuned_kernels"):
            _check(isinstance(getattr(self, name), dict), f"{name} must be an object")
        for name in [self.library, *self.files, *self.runtime_libraries]:
            _check(_plain_file_name(name), f"{name!r} is not a file name inside the artifact")
        _check(all(isinstance(d, str) and re.fullmatch(r"[0-9a-f]{64}", d) for d in self.files.values()),
               "files must map names to SHA-256 digests")
        _check(all(isinstance(k, dict) and isinstance(k.get("op"), str) for k in self.kernels.values()),
               "kernels must map names to specs with an op")
        _check(self.quant in (None, *QUANT_SCHEMES) and self.host_quant in (None, *HOST_QUANT_SCHEMES),
               f"quant must be one of {QUANT_SCHEMES} or null, host_quant one of {HOST_QUANT_SCHEMES} or null")
        self._validate_seed()
        self._validate_required_files()
        self._validate_slots()
        self._validate_programs()

    def _validate_seed(self) -> None:
        seed = self.weights_from_seed
        _check(seed is None or (isinstance(seed, dict) and _is_int(seed.get("seed"))
                                and seed.get("dtype") in WEIGHT_DTYPES), "weights_from_seed must be {seed, dtype}")

    def _validate_required_files(self) -> None:
        required = [] if self.prepare else [self.library]  # a library made on the device is not hashed
        if self.weights_from_seed is None:
            required += [WEIGHTS] + ([HOST] if self.host_tables else [])
        missing = [name for name in required if name not in self.files]
        _check(not missing, f"{missing[0] if missing else ''} is not among the hashed files")

    def _validate_slots(self) -> None:
        for key, slot in self.kv_slots.items():
            _check(slot.slot == key and _is_int(slot.layer) and slot.layer >= 0, f"kv_slots.{key}: bad slot/layer")
            _check(_is_int(slot.kv_heads) and 1 <= slot.kv_heads <= MAX_DIM, f"kv_slots.{key}.kv_heads out of range")
            _check(_is_int(slot.head_dim) and 1 <= slot.head_dim <= MAX_DIM, f"kv_slots.{key}.head_dim out of range")
            _check(isinstance(slot.ring, bool), f"kv_slots.{key}.ring must be true or false")
            window_ok = slot.window is None or (_is_int(slot.window) and 1 <= slot.window <= MAX_POSITIONS)
            _check(window_ok and (slot.window is not None or not slot.ring), f"kv_slots.{key}.window out of range")
        entry = self.entry
        _check(entry.inputs in (["ids", "positions"], ["ids", "positions", "ple_rows"]), "entry.inputs")
        _check(_strings(entry.weights) and _strings(entry.caches), "entry weights and caches must be names")
        _check(sorted(entry.caches) == sorted(self.kv_slots), "entry.caches must be the kv_slots")
        _check(len(self.host_tables) == (1 if self.has_ple else 0), "host_tables must hold the one PLE table")

    def _validate_programs(self) -> None:
        expected = set(PROGRAMS) | (set(MEDIA_PROGRAMS) | {f"encode_{t}" for t in self.media["towers"]}
                                    if self.media else set())
        _check(set(self.programs) == expected, f"programs must be {', '.join(sorted(expected))}")
        _check(self.media is None or (isinstance(self.media, dict) and set(self.media.get("towers", ()))
                                      <= set(ENCODERS)), f"media.towers must be among {ENCODERS}")
        weights, slots = set(self.entry.weights), set(self.kv_slots)
        for name, program in self.programs.items():
            _check(all(isinstance(n, str) and n.isidentifier() and isinstance(shape, list) and dtype in BUFFER_DTYPES
                       and all(_dim(d) for d in shape) for n, shape, dtype in program.inputs),
                   f"programs.{name}.inputs")
            for ref, value in program.buffers.items():
                shape, dtype = value
                _check(_strings([ref]) and dtype in BUFFER_DTYPES and isinstance(shape, list)
                       and all(_dim(d) for d in shape), f"programs.{name}.buffers.{ref}")
            for step in program.steps:
                _check(isinstance(step.kernel, str) and (step.kernel in self.kernels or step.kernel in RUNTIME_STEPS),
                       f"programs.{name}: unknown kernel {step.kernel!r}")
                _check(_strings(step.args) and isinstance(step.attrs, dict), f"programs.{name}: bad step")
                for ref in step.args:
                    kind, _, rest = ref.partition(":")
                    known = {"in": rest in program.input_names, "w": rest in weights, "kv": rest in slots,
                             "a": rest in program.buffers}
                    _check(known.get(kind, False), f"programs.{name}: unknown buffer {ref!r}")
            output = "embeddings" if name.startswith("encode_") else "logits"
            _check(list(program.outputs) == [output] and program.outputs[output][2:] in program.buffers,
                   f"programs.{name}: no {output} output")

    def write(self, directory: Path) -> None:
        """Hash every file of `directory` into `files`, then write manifest.json beside them (folders, such as
        the C runtime's include/ and lib/, which embed the manifest's own hash, are not listed)."""
        self.files = {f.name: sha256_file(f) for f in sorted(directory.iterdir()) if f.name != MANIFEST and f.is_file()}
        (directory / MANIFEST).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    # -- derived ---------------------------------------------------------------------------------------
    @property
    def has_ple(self) -> bool:
        return self.entry.inputs[2:] == ["ple_rows"]


PROGRAMS = ("prefill", "prefill_all", "decode")
MEDIA_PROGRAMS = ("prefill_media", "prefill_all_media")  # with `media`: a prompt with soft tokens
ENCODERS = ("image", "audio")  # with `media`: encode_image, encode_audio
QUANT_SCHEMES = ("q8", "q4")  # g4c.quant.SCHEMES (the artifact format does not import the compiler's modules)
HOST_QUANT_SCHEMES = ("q8", "q4", "q3")  # g4c.quant.HOST_SCHEMES
RUNTIME_STEPS = ("rows", "last", "reshape")
INDEX_DTYPES = ("int32", "int64")
WEIGHT_DTYPES = ("float32", "float16", "bfloat16")
BUFFER_DTYPES = ("float32", "int32", "int64")
MAX_DIM = 1 << 16  # heads, head_dim
MAX_POSITIONS = 1 << 24  # sliding windows
MAX_ELEMENTS = 1 << 40


class _Invalid(Exception):
    pass


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise _Invalid(what)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _strings(values) -> bool:
    return isinstance(values, list) and all(isinstance(v, str) for v in values)


def _dim(d) -> bool:
    """A buffer or input dim: a size, or a symbol the runtime binds from the inputs (T tokens, S soft tokens)."""
    return (isinstance(d, str) and d.isidentifier()) or (_is_int(d) and 0 <= d <= MAX_ELEMENTS)


def _plain_file_name(name) -> bool:
    """File references are names inside the artifact directory, never paths."""
    return isinstance(name, str) and bool(name) and name not in (".", "..") and not re.search(r"[/\\\x00]", name)


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(directory: str | Path, check_files: bool = True) -> Manifest:
    """The validated manifest of an artifact directory; with `check_files`, every listed file must
    exist and match its SHA-256."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a g4c artifact (no {MANIFEST})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: corrupt manifest ({exc})") from None
    manifest = Manifest.from_json(data, str(path))
    if check_files:
        for name, digest in manifest.files.items():
            f = directory / name
            if not f.is_file():
                raise ArtifactError(f"artifact file {name} is missing")
            if sha256_file(f) != digest:
                raise ArtifactError(f"artifact file {name} is corrupt or was modified (SHA-256 mismatch)")
    return manifest
