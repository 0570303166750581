"""The `g4c` command line. MODEL is a checkpoint directory (config.json + *.safetensors) or a preset
name (e2b, e4b, 12b, 26b-a4b, 31b, tiny-*) with `--random-weights --seed S`.

\b
Examples:
  g4c compile e2b --random-weights --layers 4 -o /tmp/e2b-4l.g4c
  g4c generate /tmp/e2b-4l.g4c --tokens 2,17,99 --max-new-tokens 8
  g4c init-random tiny-e -o /tmp/tiny-e --seed 1
  g4c inspect e2b
  g4c logits /tmp/tiny-e --tokens 2,17,99 -o out.npy
  g4c generate e2b --random-weights --layers 4 --tokens 2,17,99 --max-new-tokens 8
  g4c graph tiny-moe -o moe.dot

User errors print one line on stderr and exit with status 1; usage errors (unknown command or option,
missing or malformed value) one line and exit status 2.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from g4c.errors import G4CError

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]})
# Wide, unwrapped output when piped (tables and long lines stay greppable); the terminal's width otherwise.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

RandomOpt = typer.Option(False, "--random-weights", help="Use seeded random weights (presets have no files).")
SeedOpt = typer.Option(0, "--seed", help="Seed for random weights and for sampling.")
LayersOpt = typer.Option(None, "--layers", help="Cut the model to N layers (keeps the layer pattern and KV-shared tail).")
BackendOpt = typer.Option("reference", "--backend",
                          help="reference (numpy interpreter) or tvm (compiled kernels; compiles MODEL in memory "
                               "unless it is an artifact). Artifacts always run compiled.")
BACKENDS = ("reference", "tvm")
DEFAULT_TARGET = "llvm"  # this CPU: the one place outside g4c.targets that names a target kind
# the targets are listed by `g4c targets` (from the registry), not here: the CLI must start on a device
# that has only the runtime
TargetOpt = typer.Option(DEFAULT_TARGET, "--target", help="Compile target: KIND or KIND:PROFILE; `g4c targets` "
                         "lists them (default: this CPU).")
RpcOpt = typer.Option(None, "--rpc", help="Run the artifact on a TVM RPC server at HOST:PORT (e.g. "
                      "python -m g4c.runtime.rpc_server on the device), or a tracker with --rpc-key.")
RpcKeyOpt = typer.Option(None, "--rpc-key", help="With --rpc: HOST:PORT is an RPC tracker; run on a device it "
                         "has under this key.")
QuantOpt = typer.Option("none", "--quant", help="Group-quantize the linear and embedding matrices: q8 (int8) or "
                        "q4 (int4), one scale per 32 weights (llama.cpp's Q8_0/Q4_0 blocks), dequantized inside "
                        "the kernels; none (default) keeps --dtype.")
QuantPleOpt = typer.Option(None, "--quant-ple", help="Quantization of the PLE table (a host table read row by "
                           "row and dequantized on the host): q8, q4, q3 (3 bits + a scale per 32: 3.5 bits per weight) or none; "
                           "default: the table's own Q4_0/Q8_0 blocks in a GGUF file, else as --quant.")
QuantDotOpt = typer.Option("float", "--quant-dot", help="How quantized linears multiply: float (default: fp32 "
                           "activations, exact on the dequantized weights) or int8 (activations quantized to "
                           "int8 per 32, integer dot products, as llama.cpp does: faster on CPUs with AVX-512 "
                           "VNNI, adds the activation rounding error).")
MaxContextOpt = typer.Option(4096, "--max-context", help="Compiled runs: KV capacity of global layers (positions).")
PassesOpt = typer.Option("all", "--passes", help="Optimization passes: all (default), none, or a comma list (see `g4c passes`).")
DumpAfterOpt = typer.Option(None, "--dump-after", help="Write the IR (text + DOT) after these passes (comma list; 'input' = before any).")
DumpDirOpt = typer.Option(None, "--dump-dir", help="Folder for --dump-after files.")
ImageOpt = typer.Option(None, "--image", help="An image for the prompt (PNG, JPEG, ...; repeat for more): one "
                        "image_token_id placeholder per image in --tokens, expanded as transformers' processor does.")
AudioOpt = typer.Option(None, "--audio", help="A WAV clip for the prompt at the model's sampling rate (repeat for "
                        "more): one audio_token_id placeholder per clip in --tokens.")


def _model(model: str, random_weights: bool, seed: int, layers: Optional[int]):
    from g4c.model import load_model

    return load_model(model, random_weights=random_weights, seed=seed, num_layers=layers)


def _config(model: str, layers: Optional[int]):
    """Config only (no weights needed): a directory's config.json or a preset."""
    from g4c.model import model_config

    return model_config(model, layers)


def _session(model: str, backend: str, random_weights: bool, seed: int, layers: Optional[int],
             passes: str = "all", dump_after: Optional[str] = None, dump_dir: Optional[Path] = None,
             target: str = DEFAULT_TARGET, max_context: int = 4096, rpc: Optional[str] = None,
             rpc_key: Optional[str] = None):
    """(tokenizer directory or None, eos ids, session) for a checkpoint, preset or compiled artifact
    (run on an RPC server when `rpc` is HOST:PORT)."""
    from g4c.artifact import is_artifact
    from g4c.runtime import load

    if backend not in BACKENDS:
        raise G4CError(f"unknown backend {backend!r}: available backends are {', '.join(BACKENDS)}")
    if max_context < 1:
        raise G4CError(f"--max-context must be >= 1, got {max_context}")
    if rpc_key is not None and rpc is None:
        raise G4CError("--rpc-key needs --rpc TRACKER_HOST:PORT")
    if rpc is not None and not is_artifact(model):
        raise G4CError("--rpc runs a compiled artifact: g4c compile MODEL --target <the device's> -o DIR first")
    if is_artifact(model):
        if rpc is not None:
            from g4c.runtime import ArtifactSession
            from g4c.runtime.remote import remote_executor

            session = ArtifactSession(model, remote_executor(rpc, rpc_key), max_context)
        else:
            session = load(model, max_context)
        return Path(model), session.config.get("eos_token_id"), session
    from g4c.passes import resolve_passes
    from g4c.reference import ReferenceSession

    names = resolve_passes(passes)  # validate before loading weights
    if backend == "tvm":
        _runnable_target(target)
    loaded = _model(model, random_weights, seed, layers)
    if backend == "tvm":
        return loaded.directory, loaded.cfg.eos_token_id, _compile_in_memory(loaded, target, max_context)
    session = ReferenceSession(loaded.cfg, loaded.weights, names, _split(dump_after), dump_dir, loaded.weights.media)
    return loaded.directory, loaded.cfg.eos_token_id, session


def _compile_in_child(model: str, output: Path, target: str, random_weights: bool, seed: int,
                      layers: Optional[int], dtype: str, quant: str = "none", quant_dot: str = "float") -> Path:
    """`g4c compile` in a child process, so the compiler's memory (weights in several forms) is
    returned before the artifact is loaded: peak memory is the larger of the two, not their sum."""
    import subprocess

    args = [sys.executable, "-m", "g4c.cli", "compile", model, "-o", str(output), "--target", target,
            "--dtype", dtype, "--quant", quant, "--quant-dot", quant_dot, "--seed", str(seed), "--no-check"]  # bench times the artifact
    args += ["--random-weights"] if random_weights else []
    args += ["--layers", str(layers)] if layers is not None else []
    with err.status(f"compiling {model} for {target}"):
        result = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        raise G4CError(lines[-1].removeprefix("g4c: error: ") if lines else f"compiling {model} failed "
                       f"(exit status {result.returncode})")
    return output


def _runnable_target(name: str) -> None:
    """Refuse, before any work, targets whose artifacts cannot execute on this machine."""
    from g4c.targets.registry import get_target

    if not get_target(name).runs_here:
        raise G4CError(f"target {name} builds artifacts for another device: compile them with "
                       f"`g4c compile MODEL --target {name} -o DIR` and run DIR there")


def _compile_in_memory(loaded, target: str, max_context: int):
    import atexit
    import shutil
    import tempfile

    from g4c.runtime import load

    tmp = Path(tempfile.mkdtemp(prefix="g4c-"))
    atexit.register(shutil.rmtree, tmp, True)
    return load(_compile_with_progress(loaded.cfg, loaded.weights, target, tmp / "artifact"), max_context)


class _PlainProgress:
    """`report(stage, done, total)` as plain, flushed lines on stderr (CI logs, pipes): one when a stage
    starts and one when it finishes, and in between one per `step` of its total (at least `pause`
    seconds apart) or, on slow steps, every `seconds`: `scheduling kernels: 40/112`, ...,
    `scheduling kernels: 112/112 (8.1 s)`. A stage that takes under `pause` prints only its ends."""

    def __init__(self, step: float = 0.1, pause: float = 1.0, seconds: float = 10.0):
        self.step, self.pause, self.seconds = step, pause, seconds
        self.stages: dict[str, dict] = {}

    def __call__(self, stage: str, done: int, total: Optional[int]) -> None:
        now = time.monotonic()
        state = self.stages.get(stage)
        first = state is None
        if first:
            state = self.stages[stage] = {"start": now, "at": now, "done": done, "finished": False}
        if state["finished"]:
            return
        finished = bool(total) and done >= total
        waited = now - state["at"]
        advanced = done > state["done"]
        due = (first or finished or advanced and waited >= self.seconds
               or bool(total) and done - state["done"] >= self.step * total and waited >= self.pause)
        if not due:
            return
        line = f"{stage}: {done}/{total}" if total else f"{stage}: {done}"
        if finished and not first:
            line += f" ({now - state['start']:.1f} s)"
        print(line, file=sys.stderr, flush=True)
        state.update(at=now, done=done, finished=finished)


@contextlib.contextmanager
def _progress():
    """A `report(stage, done, total)` callback: one rich progress bar per stage on a terminal, plain
    progress lines otherwise (`_PlainProgress`)."""
    from rich.progress import Progress

    if not err.is_terminal:
        yield _PlainProgress()
        return
    with Progress(console=err, transient=True) as progress:
        tasks: dict[str, object] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        yield report


def _compile_with_progress(cfg, weights, target: str, output: Path, overwrite: bool = False,
                           dtype: str = "float32", **options) -> Path:
    from g4c.compiler import compile_model

    with _progress() as report:
        return compile_model(cfg, weights, target, output, overwrite=overwrite, progress=report, dtype=dtype,
                             **options)


def _split(text: Optional[str]) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


def parse_tokens(text: str, option: str = "--tokens") -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise G4CError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise G4CError(f"{option} is empty")
    huge = [i for i in ids if not -2**31 <= i < 2**31]  # no vocabulary comes near; numpy would overflow
    if huge:
        raise G4CError(f"{option}: token id {huge[0]} is out of range (token ids are below 2^31)")
    return ids


@app.command()
def inspect(model: str = typer.Argument(..., help="Checkpoint directory or preset."),
            layers: Optional[int] = LayersOpt,
            dtype: Optional[str] = typer.Option(None, "--dtype", help="Bytes at this dtype (default: the config's).")):
    """Layers by type, KV producers/consumers, parameter counts and bytes.

    Example: g4c inspect e2b"""
    from g4c.dtypes import DTYPE_BYTES, canonical_dtype
    from g4c.summary import (human_bytes, human_count, kv_bytes_per_token, layer_rows,
                             parameter_totals)

    cfg = _config(model, layers)
    dt = canonical_dtype(dtype) if dtype else (cfg.dtype if cfg.dtype in DTYPE_BYTES else "float32")
    table = Table(title=f"{model}: {cfg.model_type}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}")
    for col in ("layer", "attention", "head_dim", "kv heads", "window", "KV cache", "mlp", "params"):
        table.add_column(col, no_wrap=True, justify="right" if col in ("layer", "head_dim", "kv heads", "mlp", "params") else "left")
    for r in layer_rows(cfg):
        table.add_row(str(r.index), r.kind, str(r.head_dim), str(r.kv_heads), str(r.window or "–"), r.kv_role,
                      str(r.mlp), human_count(r.params))
    out.print(table)
    totals = parameter_totals(cfg)
    per = DTYPE_BYTES[dt]
    kinds = {k: sum(1 for s in cfg.layers if s.kind == k) for k in ("sliding", "global")}
    shared = sum(1 for s in cfg.layers if s.kv_mode == "reuse")
    out.print(f"layers: {kinds['sliding']} sliding (window {cfg.sliding_window}), {kinds['global']} global; "
              f"{shared} reuse another layer's KV")
    if cfg.enable_moe_block:
        out.print(f"MoE: {cfg.num_experts} experts, top-{cfg.top_k_experts}, expert width {cfg.moe_intermediate_size}")
    out.print(f"parameters: {human_count(totals['total'])} total = {human_bytes(totals['total'] * per)} in {dt}")
    out.print(f"  embedding {human_count(totals['embedding'])} (tied LM head: {cfg.tie_word_embeddings}), "
              f"PLE table {human_count(totals['ple_table'])} ({human_bytes(totals['ple_table'] * per)}, host-side gather), "
              f"layers {human_count(totals['layers'])}" + (f", experts {human_count(totals['experts'])}" if totals['experts'] else ""))
    out.print(f"KV cache: {human_bytes(kv_bytes_per_token(cfg, dt))} per token in {dt} for the layers that own a "
              f"cache, at full length (`g4c plan` gives the ring-buffer/shared plan)")
    _print_encoders(model, cfg)


def _print_encoders(model: str, cfg) -> None:
    """A multimodal checkpoint's vision/audio encoders (config only; no tensors are read)."""
    from g4c.multimodal import has_towers, read_raw_config
    from g4c.summary import human_count

    path = Path(model)
    if not (path / "config.json").is_file() or not has_towers(raw := read_raw_config(path)):
        return
    if raw.get("vision_config"):
        from g4c.vision import VisionTowerConfig, vision_tower_shapes

        v = VisionTowerConfig.from_dict(raw["vision_config"])
        params = sum(int(np.prod(s)) for s in vision_tower_shapes(v, cfg.hidden_size).values())
        out.print(f"vision encoder: {v.num_hidden_layers} layers, hidden {v.hidden_size}, {v.num_attention_heads} heads "
                  f"of {v.head_dim}, {v.patch_size}-px patches pooled {v.pooling_kernel_size}×{v.pooling_kernel_size}; "
                  f"{human_count(params)} parameters")
    if raw.get("audio_config"):
        from g4c.audio import AudioTowerConfig, audio_tower_shapes

        a = AudioTowerConfig.from_dict(raw["audio_config"])
        params = sum(int(np.prod(s)) for s in audio_tower_shapes(a, cfg.hidden_size).values())
        out.print(f"audio encoder: {a.num_hidden_layers} conformer layers, hidden {a.hidden_size}; "
                  f"{human_count(params)} parameters")


@app.command()
def graph(model: str = typer.Argument(..., help="Checkpoint directory or preset."),
          output: Path = typer.Option(..., "-o", "--output", help="Output file."),
          fmt: str = typer.Option("dot", "--format", help="dot, svg, png (need graphviz), text (the IR text form) "
                                  "or onnx (g4c-domain nodes for viewers such as Netron; not runnable)."),
          mode: str = typer.Option("prefill", "--mode", help="prefill (T tokens after P) or decode (T = 1)."),
          no_params: bool = typer.Option(False, "--no-params", help="Leave weight nodes out of the picture."),
          layers: Optional[int] = LayersOpt,
          passes: str = typer.Option("none", "--passes", help="Passes to run first: none (default), all, or a list."),
          dump_after: Optional[str] = DumpAfterOpt, dump_dir: Optional[Path] = DumpDirOpt):
    """Write the model's IR graph as DOT (or SVG/PNG, or text), optionally after passes.

    Example: g4c graph tiny-e -o tiny-e.dot --passes all"""
    from g4c.atomic import check_output_file
    from g4c.frontend import MODES, build_graph
    from g4c.ir import format_graph, verify, write_dot
    from g4c.passes import PassContext, PassManager, resolve_passes

    if mode not in MODES:
        raise G4CError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    check_output_file(output)  # before the work
    cfg = _config(model, layers)
    g = build_graph(cfg, mode, logits_to_keep=1 if mode == "prefill" else None)
    verify(g)
    g = PassManager(resolve_passes(passes), _split(dump_after), dump_dir).run(g, PassContext(cfg))
    if fmt == "text":
        output.write_text(format_graph(g) + "\n")
    elif fmt == "onnx":
        from g4c.onnx_export import graph_view

        graph_view(g, output)
    else:
        write_dot(g, output, fmt, include_params=not no_params)
    out.print(f"wrote {output} ({len(g)} nodes, {len(g.params)} weights)")


@app.command("export-onnx")
def export_onnx(model: str = typer.Argument(..., help="Checkpoint directory or preset (with --random-weights)."),
                output: Path = typer.Option(..., "-o", "--output", help="Directory to create: model.onnx + "
                                            "model.onnx.data (external weights)."),
                opset: int = typer.Option(23, "--opset", help="ONNX opset (18 or newer; 23+ uses the Attention op)."),
                dtype: str = typer.Option("fp32", "--dtype", help="fp32, or fp16 (matrices stored as float16, cast "
                                          "to float32 where read; activations and caches float32)."),
                random_weights: bool = RandomOpt, seed: int = SeedOpt, layers: Optional[int] = LayersOpt,
                overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing directory.")):
    """Export the text decoder as one standard ONNX graph for prefill and decode (input_ids, position_ids,
    past_key_values.<i>.key/.value → logits, present.<i>.key/.value), for onnxruntime and other ONNX tools.

    Example: g4c export-onnx tiny-e --random-weights -o /tmp/tiny-e.onnx"""
    from g4c.artifact import is_artifact
    from g4c.atomic import check_writable
    from g4c.onnx_export import DTYPES, check_opset, export_decoder
    from g4c.summary import human_bytes

    if is_artifact(model):
        raise G4CError(f"{model} is a compiled artifact (target-specific kernels): export-onnx reads a checkpoint "
                       "or a preset; pass the checkpoint it was compiled from")
    check_opset(opset)
    if dtype not in DTYPES:
        raise G4CError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_writable(output, overwrite)  # before loading weights
    started = time.perf_counter()
    loaded = _model(model, random_weights, seed, layers)
    with _progress() as report:
        path = export_decoder(loaded.cfg, loaded.weights, output, opset, dtype, overwrite, report)
    size = sum(f.stat().st_size for f in output.iterdir())
    out.print(f"wrote {path} (opset {opset}, {dtype}, {loaded.cfg.num_hidden_layers} layers): {human_bytes(size)} "
              f"with its external data, in {_duration(time.perf_counter() - started)}", markup=False, highlight=False)


@app.command()
def logits(model: str = typer.Argument(..., help="Checkpoint directory or preset."),
           tokens: str = typer.Option(..., "--tokens", help="Comma-separated token ids, e.g. 2,17,99."),
           output: Path = typer.Option(..., "-o", "--output", help="Where to save float32 logits [T, vocab] (.npy)."),
           backend: str = BackendOpt, random_weights: bool = RandomOpt, seed: int = SeedOpt,
           layers: Optional[int] = LayersOpt, passes: str = PassesOpt, dump_after: Optional[str] = DumpAfterOpt,
           dump_dir: Optional[Path] = DumpDirOpt, target: str = TargetOpt, max_context: int = MaxContextOpt,
           rpc: Optional[str] = RpcOpt, rpc_key: Optional[str] = RpcKeyOpt,
           image: Optional[list[Path]] = ImageOpt, audio: Optional[list[Path]] = AudioOpt):
    """Float32 logits [T, vocab] of the prompt, saved as .npy (MODEL may be a compiled artifact). With
    --image/--audio, one row per position of the expanded prompt.

    Example: g4c logits tiny-e --random-weights --tokens 2,17,99 -o out.npy"""
    from g4c.atomic import check_output_file

    check_output_file(output if str(output).endswith(".npy") else Path(f"{output}.npy"))  # np.save adds .npy
    images, clips = _media_files(image, "--image"), _media_files(audio, "--audio")
    _, _, session = _session(model, backend, random_weights, seed, layers, passes, dump_after, dump_dir, target,
                             max_context, rpc, rpc_key)
    result = session.prefill(parse_tokens(tokens), all_logits=True, images=images, audio=clips).astype(np.float32)
    np.save(output, result)
    out.print(f"wrote {output}: logits {list(result.shape)}, last-token argmax {int(np.argmax(result[-1]))}")


@app.command()
def generate(model: str = typer.Argument(..., help="Checkpoint directory or preset."),
             tokens: Optional[str] = typer.Option(None, "--tokens", help="Prompt token ids, comma-separated."),
             prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt text (needs tokenizer.json in MODEL)."),
             max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="How many tokens to generate."),
             temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
             top_k: int = typer.Option(0, "--top-k", help="Sample from the k most likely (0 = all)."),
             top_p: float = typer.Option(1.0, "--top-p", help="Nucleus mass (1 = off)."),
             stop: str = typer.Option("eos", "--stop", help="Stop tokens: 'eos' (the config's), 'none', or ids."),
             backend: str = BackendOpt, random_weights: bool = RandomOpt, seed: int = SeedOpt,
             layers: Optional[int] = LayersOpt, passes: str = PassesOpt, dump_after: Optional[str] = DumpAfterOpt,
             dump_dir: Optional[Path] = DumpDirOpt, target: str = TargetOpt, max_context: int = MaxContextOpt,
             rpc: Optional[str] = RpcOpt, rpc_key: Optional[str] = RpcKeyOpt,
             image: Optional[list[Path]] = ImageOpt, audio: Optional[list[Path]] = AudioOpt):
    """Continue a prompt (with --image/--audio: images and clips in it); the new token ids are the last
    line of stdout, comma-separated. Compiled runs print their prefill and decode speed on stderr first.

    Example: g4c generate tiny-e --random-weights --tokens 2,17,99 --max-new-tokens 8"""
    from g4c.runtime import ArtifactSession, Sampler

    if (tokens is None) == (prompt is None):
        raise G4CError("give exactly one of --tokens or --prompt")
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    images, clips = _media_files(image, "--image"), _media_files(audio, "--audio")
    directory, eos, session = _session(model, backend, random_weights, seed, layers, passes, dump_after, dump_dir,
                                       target, max_context, rpc, rpc_key)
    tokenizer = None
    if prompt is not None:
        tokenizer = _tokenizer(directory, model)
        ids = tokenizer.encode(prompt).ids
    else:
        ids = parse_tokens(tokens)
    sampled: list[float] = []  # when each new token was sampled: the first after prefill, then one per decode
    produced: list[int] = []

    def on_token(token: int) -> None:
        sampled.append(time.perf_counter())
        produced.append(token)

    start = time.perf_counter()
    try:
        new = session.generate(ids, max_new_tokens, sampler, stop_tokens=_stop_tokens(stop, eos), on_token=on_token,
                               images=images, audio=clips)
    except G4CError:
        if produced:  # a failure mid-generation (a dropped RPC session): what was generated is not lost
            print(",".join(map(str, produced)), flush=True)
        raise
    if sampled and isinstance(session, ArtifactSession):  # compiled: artifact, --rpc or --backend tvm
        prompt_length = session.position - (len(sampled) - 1)  # the prompt as run (media expand it)
        print(_speed(prompt_length, sampled[0] - start, len(sampled) - 1, sampled[-1] - sampled[0]), file=sys.stderr,
              flush=True)
    if session.context_full:
        print(f"g4c: warning: stopped after {len(new)} new tokens at the context limit ({session.max_context} "
              "positions; --max-context raises it for compiled runs)", file=sys.stderr, flush=True)
    if tokenizer is not None:
        out.print(tokenizer.decode(new), markup=False, highlight=False)
    print(",".join(map(str, new)))


def _media_files(paths: Optional[list[Path]], option: str) -> list[Path]:
    """The files of --image/--audio, checked before the model loads (a typo costs no compile)."""
    from g4c.weights import check_regular_file

    for path in paths or []:
        if not path.exists():
            raise G4CError(f"{option} {path}: no such file")
        check_regular_file(path, f"{option} file")
    return list(paths or [])


def _copy_tokenizer(model: str, directory: Optional[Path], artifact: Path) -> None:
    """The checkpoint's tokenizer.json, or a GGUF file's vocabulary converted, goes into the artifact
    (so `generate ART --prompt` works)."""
    from g4c.gguf_model import is_gguf

    if directory is not None and (directory / "tokenizer.json").is_file():
        import shutil

        shutil.copy(directory / "tokenizer.json", artifact / "tokenizer.json")
    elif is_gguf(model):
        from g4c.tokenizer import tokenizer_from_gguf

        try:
            tokenizer_from_gguf(Path(model)).save(str(artifact / "tokenizer.json"))
        except G4CError as exc:  # a file without a usable vocabulary still compiles
            err.print(f"no tokenizer.json in the artifact: {exc}", markup=False, highlight=False)


def _tokenizer(directory: Optional[Path], model: str):
    from tokenizers import Tokenizer

    from g4c.gguf_model import is_gguf

    if is_gguf(model):  # the vocabulary travels in the file
        from g4c.tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(Path(model))
    path = directory / "tokenizer.json" if directory else None
    if path is None or not path.is_file():
        raise G4CError(f"--prompt needs a tokenizer.json in the model directory; {model} has none (use --tokens)")
    return Tokenizer.from_file(str(path))


def _stop_tokens(spec: str, eos) -> list[int]:
    if spec == "none":
        return []
    if spec == "eos":
        return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return parse_tokens(spec)


@app.command("compile")
def compile_(model: str = typer.Argument(..., help="Checkpoint directory or preset."),
             output: Path = typer.Option(..., "-o", "--output", help="Artifact directory to create."),
             target: str = TargetOpt, random_weights: bool = RandomOpt, seed: int = SeedOpt,
             layers: Optional[int] = LayersOpt,
             dtype: str = typer.Option("fp32", "--dtype", help="Storage of GEMM/embedding/expert weights: fp32, "
                                       "fp16 or bf16 (activations, norms, softmax and accumulation stay fp32)."),
             quant: str = QuantOpt, quant_ple: Optional[str] = QuantPleOpt, quant_dot: str = QuantDotOpt,
             overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing directory."),
             arch: Optional[str] = typer.Option(None, "--arch", help="CUDA arch for --target cuda: sm_80, sm_86, "
                                                "sm_89, sm_90 (same as --target cuda:ARCH)."),
             bundle_runtime: bool = typer.Option(False, "--bundle-runtime", help="Copy the TVM runtime libraries "
                                                 "the target needs into DIR (libtvm_runtime.so; CUDA: + "
                                                 "libtvm_runtime_cuda.so, libcudart): DIR then runs with only "
                                                 "numpy and apache-tvm-ffi."),
             weights_from_seed: bool = typer.Option(False, "--weights-from-seed", help="With --random-weights: "
                                                    "write no weight files; the runtime regenerates them from "
                                                    "the seed (small benchmark artifacts)."),
             tuning_db: Optional[Path] = typer.Option(None, "--tuning-db", help="A `g4c tune` database: kernels "
                                                      "with a record faster than their hand schedule use it."),
             no_embed: bool = typer.Option(False, "--no-embed", help="Skip the C runtime (include/g4c.h, "
                                           "lib/libg4c.so, lib/pkgconfig/g4c.pc) that llvm, arm, cuda and vulkan "
                                           "artifacts get for apps to link."),
             check_tokens: str = typer.Option("2,17,99", "--check-tokens", help="Prompt of the self-check: when "
                                              "the artifact runs on this machine, its logits for these ids are "
                                              "compared with the reference interpreter's, and its prefill and "
                                              "decode are timed."),
             no_check: bool = typer.Option(False, "--no-check", help="Skip the self-check (it loads the artifact "
                                           "and runs the model once more in the reference interpreter).")):
    """Compile MODEL to TVM kernels: DIR gets the library, packed weights and manifest.json. Ends with a
    summary: compile time, size on disk and, when the artifact runs here, a self-check against the
    reference interpreter with prefill/decode speed.

    Example: g4c compile tiny-e --random-weights -o /tmp/tiny-e.g4c && g4c generate /tmp/tiny-e.g4c --tokens 2,17"""
    from g4c.dtypes import canonical_dtype
    from g4c.targets.registry import get_target, with_profile_option

    from g4c.quant import quant_scheme

    from g4c.compiler import lowering_options

    target = with_profile_option(target, "arch", arch)
    lowering_options(get_target(target), quant_dot)  # unknown targets, dtypes and quantizations fail before any work
    dtype = canonical_dtype(dtype)
    quant_scheme(quant), quant_scheme(quant_ple, host=True)
    check = None if no_check else parse_tokens(check_tokens, "--check-tokens")
    if tuning_db is not None:
        from g4c.tuning import TuningDB

        TuningDB(tuning_db).records()  # a damaged or foreign database fails before any work
    started = time.perf_counter()
    loaded = _model(model, random_weights, seed, layers)
    if check is not None:
        _check_vocabulary(check, loaded.cfg.input_vocab_size, "--check-tokens")
    path = _compile_with_progress(loaded.cfg, loaded.weights, target, output, overwrite, dtype,
                                  bundle_runtime=bundle_runtime, weights_from_seed=weights_from_seed, quant=quant,
                                  quant_ple=quant_ple, quant_dot=quant_dot, embed=not no_embed, tuning_db=tuning_db)
    _copy_tokenizer(model, loaded.directory, path)
    from g4c.summary import human_bytes

    out.print(f"wrote {path} (target {target}, {loaded.cfg.num_hidden_layers} layers): "
              f"{human_bytes(_disk_bytes(path))} on disk, compiled in {_duration(time.perf_counter() - started)}",
              markup=False, highlight=False)
    if tuning_db is not None:
        from g4c.artifact import read_manifest

        tuned = read_manifest(path, check_files=False).tuned_kernels
        out.print(f"tuning database {tuning_db}: {len(tuned)} kernels use a tuned schedule"
                  + (f" ({', '.join(sorted(tuned))})" if tuned else " (no record beats a hand schedule)"),
                  markup=False, highlight=False)
    _say_converted(path)
    if check is not None:
        stored = dtype if quant == "none" else f"{quant} blocks"
        _self_check(path, target, loaded, check, stored + (" with int8 activations" if quant_dot == "int8" else ""))


@app.command()
def tune(model: Optional[str] = typer.Argument(None, help="Checkpoint directory or preset (as for compile)."),
         db: Path = typer.Option(..., "--db", help="Tuning database directory (created on first use; a second "
                                 "run on it resumes)."),
         target: str = TargetOpt, random_weights: bool = RandomOpt, seed: int = SeedOpt,
         layers: Optional[int] = LayersOpt,
         dtype: str = typer.Option("fp32", "--dtype", help="Weight storage, as for compile."),
         quant: str = QuantOpt,
         time_budget: Optional[float] = typer.Option(None, "--time-budget", help="Stop after SECONDS of tuning."),
         trials: Optional[int] = typer.Option(None, "--trials", help="Stop g4c's knob search after N measured "
                                              "candidates (MetaSchedule sessions have their own count)."),
         kernels: Optional[str] = typer.Option(None, "--kernels", help="Tune only these kernels or ops "
                                               "(comma list, e.g. linear,attention)."),
         export: Optional[Path] = typer.Option(None, "--export", help="Write the database's records to FILE and "
                                               "stop."),
         import_file: Optional[Path] = typer.Option(None, "--import", help="Add FILE's records (a --export) and "
                                                    "stop."),
         rpc_tracker: Optional[str] = typer.Option(None, "--rpc-tracker", help="HOST:PORT of a TVM RPC tracker: "
                                                   "measure on the devices registered under --rpc-key (every "
                                                   "free one, in parallel) instead of this machine."),
         rpc_key: Optional[str] = typer.Option(None, "--rpc-key", help="Device key at the tracker."),
         metaschedule_trials: int = typer.Option(0, "--metaschedule-trials", help="Also run a MetaSchedule "
                                                 "session of N candidates on each kernel it can tune (decode "
                                                 "linears; ~1 min of start-up each); 0: g4c's knobs only.")):
    """Tune the schedules of MODEL's distinct kernels on this machine and record them in --db; then
    `g4c compile MODEL --tuning-db DB` uses the records that beat the hand schedules.

    Example: g4c tune e2b --random-weights --layers 2 --db /tmp/tune-db --time-budget 600"""
    from g4c.tuning import TuningDB

    if export is not None or import_file is not None:
        database = TuningDB(db, create=import_file is not None)
        if export is not None:
            out.print(f"exported {database.export(export)} records to {export}", markup=False, highlight=False)
        if import_file is not None:
            out.print(f"imported {database.import_(import_file)} new records into {db}", markup=False, highlight=False)
        return
    if model is None:
        raise G4CError("g4c tune needs MODEL (or --export / --import)")
    _tune(model, db, target, random_weights, seed, layers, dtype, quant, time_budget, trials, _split(kernels),
          rpc_tracker, rpc_key, metaschedule_trials)


def _tune(model, db, target_name, random_weights, seed, layers, dtype, quant, time_budget, trials, only,
          rpc_tracker=None, rpc_key=None, metaschedule_trials: int = 0) -> None:
    from g4c.compiler import lowered_model
    from g4c.dtypes import canonical_dtype
    from g4c.quant import quant_scheme
    from g4c.targets.registry import get_target
    from g4c.tuning import TuningDB
    from g4c.tuning.tuner import devices_for, extract_tasks, tune

    target = get_target(target_name)
    if not target.runs_here and not rpc_tracker:
        raise G4CError(f"target {target.name} does not run on this machine: measure on the device through a TVM "
                       "RPC tracker (--rpc-tracker HOST:PORT --rpc-key KEY)")
    quant_scheme(quant)
    if time_budget is not None and time_budget <= 0 or trials is not None and trials <= 0:
        raise G4CError("--time-budget and --trials must be > 0")
    if metaschedule_trials < 0:
        raise G4CError("--metaschedule-trials must be ≥ 0")
    devices = devices_for(rpc_tracker, rpc_key)
    database = TuningDB(db, create=True)
    database.records()  # a damaged database fails before any work
    loaded = _model(model, random_weights, seed, layers)
    _, lowered = lowered_model(loaded.cfg, loaded.weights, target, canonical_dtype(dtype), quant)
    tasks = extract_tasks(lowered, target, only or None)
    if not tasks:
        out.print(f"{model}: no tunable kernels on {target.name}", markup=False, highlight=False)
        return
    err.print(f"tuning {len(tasks)} kernels of {model} on {target.name} ({', '.join(d.name for d in devices)}) into "
              f"{db}", markup=False, highlight=False)

    def report(event: dict) -> None:
        if event["stage"] == "baseline":
            if event["done"] == event["total"]:
                err.print(f"hand schedules measured: {event['total']} kernels", markup=False, highlight=False)
        elif event["stage"] == "metaschedule":
            err.print(f"{event['kernel']}: MetaSchedule session of {event['trials']} candidates (cost model "
                      f"{event['cost_model']}) · {event['elapsed']:.0f} s", markup=False, highlight=False)
        elif event["stage"] == "confirm":
            err.print(f"{event['kernel']}: best {event['candidates']} re-timed against the hand schedule, "
                      f"interleaved · best {event['best']:.2f}× confirmed", markup=False, highlight=False)
        elif event["stage"] == "tune":
            eta = ""
            if event["budget"]:
                eta = f" · {max(0.0, event['budget'] - event['elapsed']):.0f} s of budget left"
            err.print(f"{event['kernel']}: {event['done']}/{event['total']} candidates · best {event['best']:.2f}× "
                      f"the hand schedule · {event['elapsed']:.0f} s{eta}", markup=False, highlight=False)

    best = tune(tasks, target, database, time_budget, trials, report, devices, metaschedule_trials)
    table = Table(title=f"tuned kernels ({db})")
    for column in ("kernel", "calls (decode / prefill)", "hand µs (decode / prefill)", "best", "knobs"):
        table.add_column(column)
    for task in tasks:
        record = best.get(task.name)
        table.add_row(task.name, f"{task.calls.get('decode', 0)} / {task.calls.get('prefill', 0)}",
                      f"{task.baseline['decode'] * 1e6:.1f} / {task.baseline['prefill'] * 1e6:.1f}",
                      f"{record.speedup:.2f}×" if record else "hand", _describe(record))
    out.print(table)


def _describe(record) -> str:
    """A best record's candidate for the table: its knobs, or that it is a MetaSchedule schedule."""
    if record is None:
        return ""
    return "MetaSchedule trace" if "trace" in record.candidate else str(record.candidate)


def _say_converted(artifact: Path) -> None:
    """One line on the checkpoint tensors stored in types without g4c kernels (a GGUF's K-quants)."""
    from g4c.artifact import read_manifest

    converted = read_manifest(artifact, check_files=False).converted_tensors
    if not converted:
        return
    stored = sorted({c["stored"] for c in converted.values()})
    held = sorted({c["as"] for c in converted.values()})
    worst = max(converted, key=lambda name: converted[name]["max_abs_error"])
    added = converted[worst]["max_abs_error"]
    out.print(f"converted {len(converted)} tensors stored as {', '.join(stored)} (no g4c kernels) to {', '.join(held)}: "
              + (f"largest added error |Δw| = {added:.3g} ({worst}; per tensor in manifest.json converted_tensors)"
                 if added else "their exact values"), markup=False, highlight=False)


CHECK_DECODE_STEPS = 4  # decode steps the compile self-check times


def _check_vocabulary(ids: list[int], vocab_size: int, option: str) -> None:
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise G4CError(f"{option}: token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")


def _disk_bytes(path: Path) -> int:
    """Bytes of the files under `path` (links not followed)."""
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def _speed(prompt_tokens: int, prefill_s: float, decode_steps: int, decode_s: float) -> str:
    """`prefill 3 tokens: 41.2 tok/s · decode: 6.3 tok/s`."""
    line = f"prefill {prompt_tokens} tokens: {prompt_tokens / max(prefill_s, 1e-9):.1f} tok/s"
    if decode_steps:
        line += f" · decode: {decode_steps / max(decode_s, 1e-9):.1f} tok/s"
    return line


def _runs_here(target: str) -> bool:
    """Whether `target`'s artifacts execute on this machine (the rule `_runnable_target` enforces)."""
    try:
        _runnable_target(target)
    except G4CError:
        return False
    return True


def _available_memory() -> Optional[int]:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _time_session(session, tokens: list[int], steps: int) -> tuple[np.ndarray, float, float]:
    """(last-token logits of a first, untimed prefill of `tokens`; seconds of a second prefill;
    seconds of `steps` greedy decode steps after it). The first run also warms up decode."""
    logits = np.array(session.prefill(tokens), dtype=np.float32)
    session.decode(int(np.argmax(logits)))
    session.reset()
    start = time.perf_counter()
    token = int(np.argmax(session.prefill(tokens)))
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        token = int(np.argmax(session.decode(token)))
    return logits, prefill_s, time.perf_counter() - start


def _self_check(path: Path, target: str, loaded, tokens: list[int], dtype: str) -> None:
    """The end of `g4c compile`: load the fresh artifact, compare its logits for `tokens` with the
    reference interpreter's (same config and weights) and time its prefill and decode. The artifact's
    session is freed before the reference runs, so the two never hold their weights at once."""
    import gc

    import g4c
    from g4c.reference import ReferenceSession
    from g4c.summary import human_bytes, parameter_totals

    def say(line: str) -> None:
        out.print(line, markup=False, highlight=False)

    if not _runs_here(target):
        say(f"self-check skipped: {target} artifacts run on another device (there: g4c generate {path.name} "
            "--tokens ..., or from here with --rpc)")
        return
    totals = parameter_totals(loaded.cfg)  # the reference holds fp32 weights (PLE rows are gathered)
    need = max(_disk_bytes(path), 4 * (totals["total"] - totals["ple_table"]))
    available = _available_memory()
    if available is not None and need > 0.9 * available:
        say(f"self-check skipped: it needs about {human_bytes(need)} of memory and {human_bytes(available)} is "
            f"available (g4c generate {path} runs the artifact alone)")
        return
    try:
        session = g4c.load(path, max_context=len(tokens) + CHECK_DECODE_STEPS + 1)
    except G4CError as exc:  # e.g. no Vulkan adapter on this machine
        say(f"self-check skipped: {exc}")
        return
    with err.status("self-check: running the artifact"):
        logits, prefill_s, decode_s = _time_session(session, tokens, CHECK_DECODE_STEPS)
    del session
    gc.collect()
    with err.status("self-check: running the reference interpreter"):
        reference = ReferenceSession(loaded.cfg, loaded.weights).prefill(tokens)
    delta = float(np.max(np.abs(logits - reference)))
    del reference
    gc.collect()
    note = f" (weights stored in {dtype}; the reference computes in float32)" if dtype != "float32" else ""
    say(f"self-check on tokens {','.join(map(str, tokens))}: max |Δlogits| vs the reference interpreter: "
        f"{delta:.1e}{note}")
    say(f"speed: {_speed(len(tokens), prefill_s, CHECK_DECODE_STEPS, decode_s)} ({CHECK_DECODE_STEPS} decode steps)")


@app.command("spirv")
def spirv(artifact: Path = typer.Argument(..., help="A --target vulkan artifact."),
          output: Path = typer.Option(..., "-o", "--output", help="Directory for the .spv modules."),
          overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing directory.")):
    """Translate a Vulkan artifact's WGSL kernels to SPIR-V (naga) and validate them (spirv-val).

    Example: g4c spirv /tmp/e2b.vulkan -o /tmp/e2b.spirv   (needs node/npm and spirv-tools)"""
    from g4c.targets.spirv import emit_spirv

    with _progress() as report:
        names = emit_spirv(artifact, output, overwrite, report)
    out.print(f"wrote {output}: {len(names)} SPIR-V modules (spirv-val: valid for Vulkan 1.1) + launches.json")


@app.command("targets")
def list_targets():
    """List the compile targets and their profiles (every module of g4c.targets with a KIND).

    Example: g4c targets"""
    from g4c.targets.registry import target_kinds

    for kind in target_kinds().values():
        out.print(kind.help(), markup=False, highlight=False)


@app.command("passes")
def list_passes():
    """List the optimization passes and the default pipeline."""
    from g4c.passes import DEFAULT_PIPELINE, available_passes

    for name, p in available_passes().items():
        out.print(f"{name:26s} {p.summary.split(' — ', 1)[-1]}", markup=False, highlight=False)
    out.print("default pipeline: " + ",".join(DEFAULT_PIPELINE), markup=False, highlight=False)


@app.command()
def plan(model: str = typer.Argument(..., help="Checkpoint directory or preset."),
         context: int = typer.Option(..., "--context", help="Maximum positions per sequence."),
         batch: int = typer.Option(1, "--batch", help="Sequences decoded together."),
         dtype: str = typer.Option("bf16", "--dtype", help="KV/activation dtype: bf16, fp16 or fp32."),
         as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
         layers: Optional[int] = LayersOpt):
    """KV-cache plan per layer (reuse / ring / full) and activation peak, against the naive plan.

    Example: g4c plan e2b --context 131072"""
    import json
    from dataclasses import asdict

    from g4c.dtypes import canonical_dtype
    from g4c.frontend import build_graph
    from g4c.passes import DEFAULT_PIPELINE, PassContext, PassManager
    from g4c.passes.memory_plan import activation_plan
    from g4c.passes.plan_kv_cache import kv_plan, naive_kv_bytes
    from g4c.summary import human_bytes

    cfg = _config(model, layers)
    dt = canonical_dtype(dtype)
    if context < 1 or batch < 1:
        raise G4CError("--context and --batch must be >= 1")
    if context > cfg.max_position_embeddings:
        raise G4CError(f"--context {context} exceeds the model's max_position_embeddings ({cfg.max_position_embeddings})")
    rows = kv_plan(cfg, context, batch, dt)
    two_tensor = kv_plan(cfg, context, batch, dt, single_tensor_k_eq_v=False)
    kv_bytes = sum(r.bytes for r in rows)
    naive = naive_kv_bytes(cfg, context, batch, dt)
    ctx = PassContext(cfg)
    prefill = PassManager(DEFAULT_PIPELINE).run(build_graph(cfg, "prefill", 1), ctx)
    decode = PassManager(DEFAULT_PIPELINE).run(build_graph(cfg, "decode"), ctx)
    chunk = min(context, cfg.sliding_window)  # prefill is chunked by the sliding window
    act_prefill = activation_plan(prefill, tokens=chunk, past=context - chunk, dtype=dt, batch=batch)
    act_decode = activation_plan(decode, tokens=1, past=context - 1, dtype=dt, batch=batch)
    result = {"model": model, "context": context, "batch": batch, "dtype": dt, "kv_bytes": kv_bytes,
              "naive_kv_bytes": naive, "k_eq_v_saving_bytes": sum(r.bytes for r in two_tensor) - kv_bytes,
              "activation_bytes": max(act_prefill.peak_bytes, act_decode.peak_bytes),
              "activation": {"prefill_chunk_tokens": chunk, "prefill_peak_bytes": act_prefill.peak_bytes,
                             "prefill_no_reuse_bytes": act_prefill.total_bytes,
                             "decode_peak_bytes": act_decode.peak_bytes,
                             "decode_no_reuse_bytes": act_decode.total_bytes},
              "layers": [asdict(r) for r in rows]}
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"KV plan: {model}, context {context}, batch {batch}, {dt}")
    for col in ("layer", "kind", "storage", "source", "slots", "tensors", "bytes"):
        table.add_column(col, no_wrap=True, justify="right" if col in ("layer", "slots", "tensors", "bytes") else "left")
    for r in rows:
        table.add_row(str(r.layer), r.kind, r.storage, str(r.source), str(r.slots), str(r.tensors), human_bytes(r.bytes))
    out.print(table)
    out.print(f"KV cache: {human_bytes(kv_bytes)} planned vs {human_bytes(naive)} naive (every layer full-length K+V) "
              f"= {naive / max(kv_bytes, 1):.1f}x less; single-tensor k_eq_v saves {human_bytes(result['k_eq_v_saving_bytes'])}")
    out.print(f"activations: peak {human_bytes(act_prefill.peak_bytes)} for a {chunk}-token prefill chunk "
              f"(no reuse: {human_bytes(act_prefill.total_bytes)}), {human_bytes(act_decode.peak_bytes)} per decode step "
              f"(no reuse: {human_bytes(act_decode.total_bytes)})")


@app.command("init-random")
def init_random(preset: str = typer.Argument(..., help="Preset name (or a directory with a config.json)."),
                output: Path = typer.Option(..., "-o", "--output", help="Checkpoint directory to create."),
                layers: Optional[int] = LayersOpt,
                seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
                dtype: str = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16."),
                overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing directory.")):
    """Write a random HF-format checkpoint (config.json + safetensors) transformers can load.

    Example: g4c init-random e2b --layers 4 -o /tmp/e2b-4l --dtype bf16"""
    from g4c.checkpoint import write_random_checkpoint
    from g4c.dtypes import canonical_dtype

    cfg = _config(preset, layers)
    dtype = canonical_dtype(dtype)
    with _progress() as report:
        path = write_random_checkpoint(cfg, output, seed=seed, dtype=dtype, overwrite=overwrite,
                                       progress=lambda done, total: report("writing tensors", done, total))
    out.print(f"wrote {path} ({cfg.num_hidden_layers} layers, {dtype}, seed {seed})")


@app.command("bench")
def bench(model: str = typer.Argument(..., help="Compiled artifact, checkpoint directory or preset (compiled first)."),
          target: str = TargetOpt, random_weights: bool = RandomOpt, seed: int = SeedOpt,
          layers: Optional[int] = LayersOpt,
          dtype: str = typer.Option("fp32", "--dtype", help="Weight storage when MODEL must be compiled."),
          quant: str = QuantOpt, quant_dot: str = QuantDotOpt,
          prompt_len: int = typer.Option(64, "--prompt-len", help="Prompt tokens to prefill (random ids)."),
          gen: int = typer.Option(16, "--gen", help="Timed decode steps (the median is reported)."),
          context: int = typer.Option(0, "--context", help="Decode at this many cached positions (random KV "
                                      "contents; default: right after the prompt)."),
          threads: int = typer.Option(os.cpu_count() or 1, "--threads", help="Kernel threads."),
          profile: bool = typer.Option(False, "--profile", help="Per-kernel prefill and decode times (VM instrument hook)."),
          as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table.")):
    """Prefill/decode tok/s, time to first token, peak memory, KV bytes and the decode roofline ratio.

    Example: g4c bench e2b --random-weights --layers 4 --prompt-len 64 --gen 16 --profile"""
    import json
    import tempfile

    from g4c.bench import bench_session, format_result, measured_bandwidth
    from g4c.artifact import is_artifact, read_manifest
    from g4c.runtime import load
    from g4c.runtime.relax_vm import DEVICE_CPU

    if prompt_len < 1 or gen < 1 or threads < 1 or context < 0:
        raise G4CError("--prompt-len, --gen and --threads must be >= 1 and --context >= 0")
    _runnable_target(target)  # unknown or foreign targets fail before any work
    os.environ["TVM_NUM_THREADS"] = str(threads)  # read when the runtime's thread pool starts
    with tempfile.TemporaryDirectory(prefix="g4c-bench-") as tmp:
        directory = Path(model)
        if not is_artifact(model):
            directory = _compile_in_child(model, Path(tmp) / "artifact", target, random_weights, seed, layers, dtype,
                                          quant, quant_dot)
        with err.status("measuring memory bandwidth"):  # before loading: its buffers must not add to peak RSS
            bandwidth = measured_bandwidth(threads)
        manifest = read_manifest(directory, check_files=False)
        if manifest.runtime != "relax-vm" or manifest.device_type != DEVICE_CPU:
            raise G4CError(f"g4c bench measures CPU artifacts; this one is for {manifest.target} "
                           "(GPU benchmarks: scripts/gpu_check.sh on the GPU machine)")
        session = load(directory, max_context=max(context, prompt_len) + gen + 8, prefill_chunk=prompt_len)
        with err.status("timing prefill and decode"):
            result = bench_session(session, prompt_len, gen, context, threads, bandwidth, profile)
    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        out.print(format_result(result), markup=False, highlight=False)


@app.command("tokenizer")
def tokenizer_cmd(gguf_vocab: Path = typer.Argument(..., help="GGUF file with a Gemma 4 vocabulary, e.g. llama.cpp's "
                                                    "models/ggml-vocab-gemma-4.gguf."),
                  output: Path = typer.Option(..., "-o", "--output", help="tokenizer.json to write (or a checkpoint "
                                              "directory to put it in).")):
    """Write a Hugging Face tokenizer.json from a GGUF vocabulary (so --prompt TEXT works).

    Example: g4c tokenizer ggml-vocab-gemma-4.gguf -o /tmp/e2b-4l"""
    from g4c.tokenizer import write_tokenizer_json

    if not gguf_vocab.is_file():
        raise G4CError(f"{gguf_vocab}: no such file")
    if output.is_dir():
        output = output / "tokenizer.json"
    with err.status("building the BPE tokenizer"):
        path = write_tokenizer_json(gguf_vocab, output)
    out.print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app. User errors become one line on stderr and exit status 1; usage errors
    (unknown command or option, missing or malformed value) one line and exit status 2; no arguments
    prints the help and exits with status 2."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if not args:
            app(args=["--help"], standalone_mode=False, prog_name="g4c")
            return 2
        app(args=args, standalone_mode=False, prog_name="g4c")
    except G4CError as exc:
        print(f"g4c: error: {exc}", file=sys.stderr)
        return 1
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        print("g4c: aborted", file=sys.stderr)
        return 1
    except typer.TyperException as exc:  # typer's (bundled click's) usage errors: exit status 2
        print(_usage_error(exc, args), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


def _usage_error(exc: Exception, args: list[str]) -> str:
    """One line: `g4c compile: error: Missing option '-o' / '--output' (see g4c compile --help)`."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        command = ctx.command_path
    else:  # some parse errors carry no context: name the command from the arguments
        names = {(c.name or c.callback.__name__).replace("_", "-") for c in app.registered_commands}
        command = f"g4c {args[0]}" if args and args[0] in names else "g4c"
    return f"{command}: error: {message} (see {command} --help)"


if __name__ == "__main__":
    sys.exit(main())
