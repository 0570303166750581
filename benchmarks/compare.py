"""g4c vs transformers vs llama.cpp on identical random weights, one command, one machine.

    bash benchmarks/setup_llama_cpp.sh      # once: builds llama-cpp-python (not part of CI)
    python benchmarks/compare.py            # E2B-shaped x10 layers + 26B-A4B MoE slice, all engines

Steps: `g4c init-random` writes an HF checkpoint (fp32) plus a real Gemma 4 tokenizer.json made from
llama.cpp's vocabulary; g4c compiles it for the host (fp32 and fp16 weights; q8/q4: its own Q8_0/Q4_0
blocks, with fp32 or int8 (VNNI) dot products); llama.cpp's convert_hf_to_gguf.py converts the same
checkpoint to GGUF f32/f16, and llama.cpp's quantizer (llama_model_quantize, default parameters) turns
the f32 GGUF into Q8_0/Q4_0, which g4c also compiles as stored ("g4c q4 (GGUF)": llama.cpp's weights);
then each engine runs in its own process (benchmarks/engines.py) with the same thread count and prompt.
The memory bandwidth is measured at the start of every round (g4c.bench.measured_bandwidth; the best is
kept, like each engine's best round) and every decode speed is compared with the roofline bandwidth /
bytes read per step; each row also reports its size on disk (artifact directory, GGUF or checkpoint)
and its peak RSS.
Writes benchmarks/results/<host>.json, benchmarks/results/<host>.png and benchmarks/RESULTS.md
(never edit RESULTS.md by hand: rerun this script).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ENGINES_PY = HERE / "engines.py"
LLAMA_SRC = Path(os.environ.get("G4C_CACHE", Path.home() / ".cache" / "g4c")) / "llama-cpp-python-0.3.36" / "vendor" / "llama.cpp"


def need_disk(path: Path, gigabytes: float) -> None:
    """Fail with one clear line before a conversion that would fill the disk half-way."""
    import shutil

    free = shutil.disk_usage(path).free / 1e9
    if free < gigabytes:
        sys.exit(f"compare.py: error: {path} has {free:.1f} GB free, this step needs about {gigabytes:.1f} GB")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> str:
    log(" ".join(str(c).strip().splitlines()[0] for c in cmd))  # a `-c` script: its first line
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if proc.returncode != 0:  # the last line says why: a table row shows it
        raise RuntimeError(f"{cmd[0]} {cmd[1]} failed:\n{proc.stderr[-3000:]}\n{_reason(proc.stderr)}")
    return proc.stdout


def _reason(stderr: str) -> str:
    """The line of a failed command's stderr that says why: a Python exception, a ggml assertion
    (ggml then prints a gdb backtrace after it), else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for marker in ("GGML_ASSERT", "Error", "error:", "failed"):
        if found := [line for line in lines if marker in line]:
            return found[-1]
    return lines[-1] if lines else "no output"


def g4c(*args) -> str:
    return run([sys.executable, "-m", "g4c.cli", *args])


# -- artifacts --------------------------------------------------------------------------------------
def checkpoint(work: Path, preset: str, layers: int) -> Path:
    path = work / f"{preset}-{layers}l"
    if not (path / "config.json").is_file():
        need_disk(work, 4 * _params(preset, layers) / 1e9 * 1.1)
        g4c("init-random", preset, "--layers", layers, "-o", path, "--overwrite")
    if not (path / "tokenizer.json").is_file() and (LLAMA_SRC / "models" / "ggml-vocab-gemma-4.gguf").is_file():
        g4c("tokenizer", LLAMA_SRC / "models" / "ggml-vocab-gemma-4.gguf", "-o", path)
    return path


PRECISIONS = ("f32", "f16", "q8", "q4")
LLAMA_FTYPES = {"q8": "Q8_0", "q4": "Q4_0"}  # llama_model_quantize's LLAMA_FTYPE_MOSTLY_<name>
# Artifact (and GGUF) size / fp32 checkpoint size, for the disk check before writing one: f16 half,
# q8 8.5 bits and q4 4.5 bits per weight (+ small fp32 tensors; llama.cpp's Q4_0 keeps the tied
# embedding / per-layer table at Q6_K, 6.6 bits).
SIZE_FACTOR = {"f32": 1.0, "f16": 0.55, "q8": 0.3, "q4": 0.16}
GGUF_SIZE_FACTOR = {"f32": 1.0, "f16": 0.5, "q8": 0.3, "q4": 0.22}


def g4c_artifact(ckpt: Path, precision: str, quant_dot: str = "float") -> Path:
    """Always recompiled: the kernels are what is being measured (checkpoints and GGUFs are cached).
    q8/q4: `--quant` (g4c's own Q8_0/Q4_0 blocks made from the fp32 checkpoint), `quant_dot` "int8"
    for integer dot products on int8-rounded activations (llama.cpp's arithmetic)."""
    suffix = precision + ("-int8" if quant_dot == "int8" else "")
    path = ckpt.with_name(f"{ckpt.name}.{suffix}.g4c")
    need_disk(ckpt.parent, _size(ckpt) * SIZE_FACTOR[precision] / 1e9)
    if precision in LLAMA_FTYPES:
        flags = ["--quant", precision, "--quant-dot", quant_dot]
    else:
        flags = ["--dtype", {"f32": "fp32", "f16": "fp16"}[precision]]
    g4c("compile", ckpt, *flags, "-o", path, "--overwrite", "--no-check")
    return path


def onnx_export(ckpt: Path) -> Path:
    out = ckpt.parent / f"{ckpt.name}.onnx"
    if not (out / "model.onnx").exists():
        g4c("export-onnx", ckpt, "-o", out, "--overwrite")
    return out / "model.onnx"


def g4c_from_gguf(model: Path) -> Path:
    """A llama.cpp GGUF compiled by g4c as stored: its Q4_0/Q8_0 blocks byte for byte (int8 dot
    products, llama.cpp's arithmetic), its other tensors (F32, and K-quants such as the Q6_K tables
    llama.cpp's Q4_0 keeps) as exact fp32 values: the very weights llama.cpp runs."""
    path = model.with_suffix(".g4c")
    stored = sum(t.n_bytes if t.tensor_type.name in ("Q4_0", "Q8_0") else 4 * t.n_elements
                 for t in _gguf_reader(model).tensors)
    need_disk(model.parent, stored / 1e9)
    g4c("compile", model, "--quant-dot", "int8", "-o", path, "--overwrite", "--no-check")
    return path


def gguf(ckpt: Path, precision: str) -> Path:
    """llama.cpp's files: convert_hf_to_gguf.py for f32/f16; Q8_0/Q4_0 by llama.cpp's own quantizer
    (`llama_model_quantize`, default parameters, as `llama-quantize` does) from the f32 GGUF, so its
    blocks are rounded once from the exact fp32 weights."""
    path = ckpt.with_name(f"{ckpt.name}.{LLAMA_FTYPES.get(precision, precision)}.gguf")
    if path.is_file():
        return path
    source = gguf(ckpt, "f32") if precision in LLAMA_FTYPES else None
    tmp = path.with_suffix(".partial")
    need_disk(ckpt.parent, _size(ckpt) * GGUF_SIZE_FACTOR[precision] / 1e9)
    try:
        if source is None:
            run([sys.executable, LLAMA_SRC / "convert_hf_to_gguf.py", ckpt, "--outtype", precision, "--outfile", tmp])
        else:
            run([sys.executable, "-c", QUANTIZE, source, tmp, LLAMA_FTYPES[precision]])
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written GGUF left behind
        raise
    tmp.rename(path)
    return path


QUANTIZE = """# llama_model_quantize(SOURCE, OUT, default params with ftype LLAMA_FTYPE_MOSTLY_<FTYPE>)
import sys, llama_cpp
source, out, ftype = sys.argv[1:]
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + ftype)
sys.exit(llama_cpp.llama_model_quantize(source.encode(), out.encode(), params))
"""


def _gguf_reader(path: Path):
    from gguf import GGUFReader

    return GGUFReader(str(path))


def gguf_summary(path: Path) -> dict:
    """What a GGUF stores: its matrices' types ({type: [tensor names, blk.N → blk.*]}) and the
    bytes llama.cpp reads per decode step for its weights (the rules of g4c.bench.decode_weight_bytes:
    an embedding gather one row, a tied LM head the whole table, an expert bank its top_k/experts)."""
    reader = _gguf_reader(path)
    experts, top_k = (int(f.contents()) if (f := reader.fields.get(f"gemma4.{key}")) else 0
                      for key in ("expert_count", "expert_used_count"))
    names = {t.name for t in reader.tensors}
    types: dict[str, set] = {}
    read = 0
    for t in reader.tensors:
        rows = int(t.shape[-1]) if len(t.shape) > 1 else 1
        if t.name == "per_layer_token_embd.weight" or (t.name == "token_embd.weight" and "output.weight" in names):
            read += t.n_bytes // rows
        elif "_exps." in t.name and experts:
            read += int(t.n_bytes * top_k / experts)
        else:
            read += t.n_bytes
        if len(t.shape) > 1:
            name = ".".join("*" if part.isdigit() else part for part in t.name.split("."))
            types.setdefault(t.tensor_type.name, set()).add(name)
    return {"types": {k: sorted(v) for k, v in types.items()}, "decode_weight_bytes": read}


def _size(path: Path) -> int:
    """Bytes of a file, or of a directory's files (an artifact, an ONNX export with its data)."""
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _params(preset: str, layers: int) -> int:
    from g4c.presets import preset_config
    from g4c.summary import parameter_totals

    return parameter_totals(preset_config(preset, layers))["total"]


def remove_outputs(ckpt: Path) -> None:
    """Delete a model's checkpoint, artifacts and GGUFs (tens of GB for the MoE slice)."""
    import shutil

    for path in [ckpt, *ckpt.parent.glob(f"{ckpt.name}.*")]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


# -- engines ------------------------------------------------------------------------------------------
def engine(name: str, model: Path, args, work: Path, extra: list[str] = (), contexts: str = "") -> dict:
    logits = work / f"logits-{model.name}-{'-'.join(extra) or 'x'}.npy"
    cmd = [sys.executable, ENGINES_PY, name, model, "--threads", args.threads, "--gen", args.gen,
           "--prompt-lens", args.prompt_lens, "--logits", logits, *extra]
    if contexts:
        cmd += ["--contexts", contexts]
    try:
        result = json.loads(run(cmd).strip().splitlines()[-1])
    except RuntimeError as exc:  # one engine failing must not lose the others' numbers
        message = str(exc).strip().splitlines()[-1][:200]
        log(f"{name} failed: {message}")
        return {"error": message}
    result["logits_file"] = str(logits)
    return result


def engines_for(model_name: str, ckpt: Path, args, work: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """Every engine on this checkpoint, `args.rounds` times in turn; each number is its best round.
    Returns (rows, {GGUF precision: gguf_summary}).

    Shared machines drift by 10-20% within minutes, so one engine measured late would be judged on a
    different machine; interleaving the rounds and keeping each engine's best evens that out."""
    have_llama = (LLAMA_SRC / "convert_hf_to_gguf.py").is_file() and _importable("llama_cpp")
    contexts = args.contexts if model_name == "e2b" else ""
    precisions = (args.precisions if model_name == "e2b" else args.moe_precisions).split(",")
    # name -> (engine, how to make its model file, engine flags, contexts, precision)
    plan: dict[str, tuple] = {}
    for p in precisions:
        if p in LLAMA_FTYPES:
            plan[f"g4c {p}"] = ("g4c", lambda p=p: g4c_artifact(ckpt, p), [], "", p)
            plan[f"g4c {p} int8"] = ("g4c", lambda p=p: g4c_artifact(ckpt, p, "int8"), [], "", p)
            if p == "q4" and have_llama:  # llama.cpp's Q4_0 file itself: the same weights as its row
                plan[f"g4c {p} (GGUF)"] = ("g4c", lambda p=p: g4c_from_gguf(gguf(ckpt, p)), [], "", p)
        else:
            plan[f"g4c {p}"] = ("g4c", lambda p=p: g4c_artifact(ckpt, p), [], contexts if p == "f32" else "", p)
    if "f32" in precisions and _importable("onnxruntime"):  # g4c's ONNX export, run by onnxruntime
        plan["onnxruntime f32"] = ("onnxruntime", lambda: onnx_export(ckpt), [], contexts, "f32")
    plan["transformers eager f32"] = ("transformers", lambda: ckpt, ["--attn", "eager"], contexts, "f32")
    plan["transformers sdpa f32"] = ("transformers", lambda: ckpt, ["--attn", "sdpa"], "", "f32")
    if have_llama:
        for p in precisions:
            label = LLAMA_FTYPES.get(p, p)
            plan[f"llama.cpp {label}"] = ("llama.cpp", lambda p=p: gguf(ckpt, p), [], "", p)
            plan[f"llama.cpp {label} flash-attn"] = ("llama.cpp", lambda p=p: gguf(ckpt, p), ["--flash-attn"], "", p)
    else:
        log("llama.cpp not set up (bash benchmarks/setup_llama_cpp.sh): skipping it")
    rows: dict[str, dict] = {}
    jobs: dict[str, tuple] = {}
    about: dict[str, dict] = {}  # per row: precision, size on disk, llama.cpp's weight bytes per step
    ggufs: dict[str, dict] = {}
    for name, (kind, make, extra, ctx, precision) in plan.items():
        try:  # a conversion or compile failing (e.g. int8 dot products on a CPU without VNNI) is one row
            model = make()
        except RuntimeError as exc:
            message = str(exc).strip().splitlines()[-1][:200]
            log(f"{name} failed: {message}")
            rows[name] = {"error": message}
            continue
        jobs[name] = (kind, model, extra, ctx)
        about[name] = {"precision": precision,
                       "artifact_gb": _size(model.parent if model.suffix == ".onnx" else model) / 1e9}
        if kind == "llama.cpp":
            if precision not in ggufs:
                ggufs[precision] = gguf_summary(model)
            about[name]["decode_weight_bytes"] = ggufs[precision]["decode_weight_bytes"]
    from g4c.bench import measured_bandwidth

    for round_ in range(args.rounds):
        args.bandwidths.append(measured_bandwidth(int(args.threads)))
        log(f"round {round_ + 1}/{args.rounds}: read bandwidth {args.bandwidths[-1]:.1f} GB/s")
        for name, (kind, model, extra, ctx) in jobs.items():
            log(f"round {round_ + 1}/{args.rounds}: {name}")
            result = engine(kind, model, args, work, extra, ctx)
            rows[name] = best_of(rows[name], result) if name in rows else result
    for name, extra in about.items():
        if "error" not in rows[name]:
            rows[name].update(extra)
    reference = rows["transformers eager f32"].get("logits_file")
    for row in rows.values():
        if "logits_file" in row and reference:
            diff = np.abs(np.load(row.pop("logits_file")) - np.load(reference))
            row["max_abs_logit_diff_vs_transformers"] = float(diff.max())
    return rows, ggufs


def best_of(a: dict, b: dict) -> dict:
    """Merge two rounds of one engine: highest tok/s, lowest time to first token, highest peak RSS."""
    if "error" in a or "error" in b:
        return a if "error" in b else b
    merged = dict(a)
    for key in ("prefill", "decode"):
        merged[key] = {n: max(a[key][n], b[key][n]) for n in a[key]}
    merged["ttft_s"] = {n: min(a["ttft_s"][n], b["ttft_s"][n]) for n in a["ttft_s"]}
    merged["peak_rss_mb"] = max(a["peak_rss_mb"], b["peak_rss_mb"])
    return merged


def _importable(module: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


# -- report -------------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for module in ("g4c", "tvm", "torch", "transformers", "llama_cpp", "numpy"):
        out = subprocess.run([sys.executable, "-c", f"import {module}; print({module}.__version__)"],
                             capture_output=True, text=True)
        versions[module] = out.stdout.strip() or "not installed"
    return {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "versions": versions}


def roofline(results: dict, bandwidth: float) -> None:
    """Attach decode roofline ratios: tok/s / (bandwidth / bytes read per step at that context).

    A g4c row counts its own artifact's bytes (`decode_bytes`: the weights as stored, quantized blocks
    and scales included, plus fp32 KV rows). A llama.cpp row counts its GGUF's weights as stored
    (`decode_weight_bytes`, from the file's tensor types: a Q4_0 file keeps Q6_K tables) plus the
    same KV rows in its f16 cache; without that, the g4c row of the same precision. transformers rows
    (fp32 weights and cache) use the g4c f32 row's."""
    for model in results["models"].values():
        engines = model["engines"]
        f32 = engines.get("g4c f32", {})
        for name, row in engines.items():
            if "error" in row:
                continue
            precision = row.get("precision") or ("f16" if "f16" in name else "f32")
            same = engines.get(f"g4c {precision}", {})
            g4c_row = row if "decode_bytes" in row else same if "decode_bytes" in same else f32
            if "decode_bytes" not in g4c_row:
                row["roofline"] = {}
                continue
            step_bytes = {n: int(b) for n, b in g4c_row["decode_bytes"].items()}
            if name.startswith("llama.cpp") and "decode_weight_bytes" in row and "decode_weight_bytes" in g4c_row:
                kv = {n: b - int(g4c_row["decode_weight_bytes"]) for n, b in step_bytes.items()}
                step_bytes = {n: int(row["decode_weight_bytes"]) + kv[n] // 2 for n in kv}
            row["step_bytes"] = step_bytes
            row["roofline"] = {n: tok_s * step_bytes[n] / (bandwidth * 1e9)
                               for n, tok_s in row["decode"].items() if n in step_bytes}


def _types_line(label: str, summary: dict) -> str:
    """llama.cpp's file of one precision: its matrices' types, the file's own type first."""
    types = sorted(summary["types"].items(), key=lambda kv: -len(kv[1]))
    main, *others = types
    text = f"llama.cpp {label} file: matrices {main[0]}"
    if others:
        text += ", except " + "; ".join(f"{', '.join(f'`{n}`' for n in names)} {kind}" for kind, names in others)
    return text + " (1-D tensors F32)."


def _fmt(value, spec: str) -> str:
    """A table cell: `value` formatted, or – where a row has none (e.g. no g4c f32 row to take the
    transformers rows' bytes from, or results saved before the column existed)."""
    return "–" if value is None else format(value, spec)


def markdown(results: dict) -> str:
    m = results["machine"]
    lens = results["args"]["prompt_lens"].split(",")
    out = ["# g4c benchmark results", "",
           "Generated by `python benchmarks/compare.py` — do not edit by hand.", "",
           f"- machine: {m['cpu']}, {m['cores']} cores, {m['date']}",
           "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
           f"- threads: {results['args']['threads']}; measured read bandwidth {results['bandwidth_gb_s']:.1f} GB/s "
           f"({results['bandwidth_threads']} threads, best of numpy/BLAS reads and g4c's GEMV over 1 GiB, "
           f"`g4c.bench.measured_bandwidth`, measured before every round: "
           f"{', '.join(map(str, results['bandwidth_rounds_gb_s']))} GB/s)", ""]
    for key, model in results["models"].items():
        first = lens[0]
        out += [f"## {model['title']}", "",
                "| engine | " + " | ".join(f"prefill {n} tok/s" for n in lens)
                + f" | decode tok/s (ctx {first}) | roofline | GB read / step | TTFT {first} (ms) | peak RSS (GB) "
                  "| size on disk (GB) | max abs Δlogits vs transformers |",
                "|---|" + "---|" * (len(lens) + 7)]
        for name, row in model["engines"].items():
            if "error" in row:
                out.append(f"| {name} | failed: {row['error']} |" + " |" * (len(lens) + 6))
                continue
            ratio, step = row.get("roofline", {}).get(first), row.get("step_bytes", {}).get(first)
            diff = row.get("max_abs_logit_diff_vs_transformers")
            out.append(f"| {name} | " + " | ".join(f"{row['prefill'][n]:.1f}" for n in lens)
                       + f" | {row['decode'][first]:.2f} | {_fmt(ratio, '.0%')} | {_fmt(step and step / 1e9, '.2f')}"
                       + f" | {1e3 * row['ttft_s'][first]:.0f} | {row['peak_rss_mb'] / 1024:.1f}"
                       + f" | {_fmt(row.get('artifact_gb'), '.2f')} | {_fmt(diff, '.2e')} |")
        out.append("")
        for precision, summary in model.get("gguf_types", {}).items():
            out.append("- " + _types_line(LLAMA_FTYPES.get(precision, precision), summary))
        if model.get("gguf_types"):
            out.append("")
        ctx = [c for c in results["args"]["contexts"].split(",") if c]
        if key == "e2b" and ctx:
            out += ["### Decode tok/s vs context (random KV contents; sliding layers read ≤ window rows)", "",
                    "| engine | " + " | ".join(ctx) + " |", "|---|" + "---|" * len(ctx)]
            for name, row in model["engines"].items():
                if all(c in row.get("decode", {}) for c in ctx):
                    out.append(f"| {name} | " + " | ".join(f"{row['decode'][c]:.2f}" for c in ctx) + " |")
            out.append("")
    out += [f"![results]({results['plot']})", "", "## Notes", "", results.get("notes", "")]
    return "\n".join(out) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"].items())
    rows = max(len(model["engines"]) for _, model in models)  # quantized rows: up to 17 bars
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(6 * (len(models) + 1), max(5, 0.32 * rows)))
    first = results["args"]["prompt_lens"].split(",")[0]
    for ax, (key, model) in zip(axes, models):
        names = [n for n, row in model["engines"].items() if "error" not in row]
        decode = [model["engines"][n]["decode"][first] for n in names]
        ax.barh(names, decode, color=["tab:green" if n.startswith("g4c") else "tab:gray" for n in names])
        ax.set_xlabel(f"decode tok/s (context {first}, {results['args']['threads']} threads)")
        ax.set_title(model["title"], fontsize=9)
        ax.invert_yaxis()
    ax = axes[-1]
    ctx = [c for c in results["args"]["contexts"].split(",") if c]
    e2b = results["models"].get("e2b")
    if e2b and ctx:
        for name, row in e2b["engines"].items():
            if all(c in row.get("decode", {}) for c in ctx):
                ax.plot([int(c) for c in ctx], [row["decode"][c] for c in ctx], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (positions in the KV cache)")
        ax.set_ylabel("decode tok/s")
        ax.set_title("E2B-shaped decode vs context", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=10, help="E2B-shaped depth (keeps pattern + KV-shared tail)")
    parser.add_argument("--moe-layers", type=int, default=2, help="26B-A4B-shaped MoE slice depth")
    parser.add_argument("--models", default="e2b,moe", help="which of e2b, moe to run")
    parser.add_argument("--moe-precisions", default="f32,q4",
                        help="MoE slice precisions (f32,q4 needs ~37 GB of disk for checkpoint, artifacts, GGUFs)")
    parser.add_argument("--keep", action="store_true", help="keep checkpoints, artifacts and GGUFs in --work")
    parser.add_argument("--render", type=Path, metavar="RESULTS_JSON",
                        help="only re-render RESULTS.md and the plot from a saved results JSON (e.g. after editing NOTES.md)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--gen", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per engine (best is kept)")
    parser.add_argument("--prompt-lens", default="64,512")
    parser.add_argument("--contexts", default="512,2048,8192,32768")
    parser.add_argument("--precisions", default="f32,f16,q8,q4",
                        help="E2B precisions: f32, f16 (weights), q8, q4 (g4c --quant, float and int8 dot "
                             "products; llama.cpp Q8_0/Q4_0 from its own quantizer)")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("G4C_CACHE", Path.home() / ".cache" / "g4c")) / "bench")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--notes", type=Path, default=HERE / "NOTES.md",
                        help="Markdown appended to RESULTS.md (analysis of the gaps)")
    args = parser.parse_args()
    if args.render:
        write_reports(json.loads(args.render.read_text()), args)
        return
    args.bandwidths = []
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # g4c's GEMV bandwidth kernel, in this process
    args.work.mkdir(parents=True, exist_ok=True)
    models = {"e2b": ("e2b", args.layers, f"E2B-shaped, {args.layers} layers (hidden 1536, vocab 262144, PLE, KV sharing)"),
              "moe": ("26b-a4b", args.moe_layers,
                      f"26B-A4B-shaped MoE slice, {args.moe_layers} layers (128 experts, top-8, hidden 2816)")}
    chosen = [m for m in args.models.split(",") if m]
    if unknown := set(chosen) - set(models):
        parser.error(f"unknown --models {', '.join(sorted(unknown))}: choose from e2b, moe")
    models = {k: v for k, v in models.items() if k in chosen}
    for key, flag, depth in (("e2b", "--layers", args.layers), ("moe", "--moe-layers", args.moe_layers)):
        if key in models and depth < 2:  # llama.cpp asserts is_swa_any(): a 1-layer cut keeps only the global layer
            parser.error(f"{flag} {depth}: llama.cpp's gemma4 needs a sliding-window layer, use 2 or more")
    for flag, value in (("--precisions", args.precisions), ("--moe-precisions", args.moe_precisions)):
        if bad := [p for p in value.split(",") if p not in PRECISIONS]:
            parser.error(f"unknown {flag} {', '.join(bad)}: choose from {', '.join(PRECISIONS)}")
    results = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items() if k != "bandwidths"},
               "models": {}}
    for key, (preset, layers, title) in models.items():
        ckpt = checkpoint(args.work, preset, layers)
        rows, ggufs = engines_for(key, ckpt, args, args.work)
        results["models"][key] = {"title": title, "engines": rows, "gguf_types": ggufs}
        if not args.keep:
            remove_outputs(ckpt)
    results["bandwidth_gb_s"] = max(args.bandwidths)
    results["bandwidth_rounds_gb_s"] = [round(b, 1) for b in args.bandwidths]
    results["bandwidth_threads"] = args.threads
    roofline(results, results["bandwidth_gb_s"])
    write_reports(results, args)


def write_reports(results: dict, args) -> None:
    """results/<host>.json, results/<host>.png and RESULTS.md (with NOTES.md appended)."""
    out_dir = args.out / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = results["machine"]["host"]
    plot(results, out_dir / f"{stem}.png")
    results["plot"] = f"results/{stem}.png"
    results["notes"] = args.notes.read_text() if args.notes.is_file() else ""
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (args.out / "RESULTS.md").write_text(markdown(results) + kept_sections(args.out / "RESULTS.md"))
    print(markdown(results))


EMBED_BEGIN, EMBED_END = "<!-- embed: written by benchmarks/embed.py -->", "<!-- /embed -->"


def kept_sections(path: Path) -> str:
    """The sections other benchmark scripts write into RESULTS.md, between their `<!-- NAME: written by
    benchmarks/SCRIPT -->` and `<!-- /NAME -->` markers (embed.py's C runtime table, tuning.py's)."""
    import re

    text = path.read_text() if path.is_file() else ""
    found = re.finditer(r"<!-- (\w+): written by benchmarks/.*?<!-- /\1 -->", text, flags=re.S)
    return "".join("\n" + block.group(0) + "\n" for block in found)


if __name__ == "__main__":
    main()
