"""g4c vs transformers vs llama.cpp on identical random weights, one command, one machine.

    bash benchmarks/setup_llama_cpp.sh      # once: builds llama-cpp-python (not part of CI)
    python benchmarks/compare.py            # E2B-shaped x10 layers + 26B-A4B MoE slice, all engines

Steps: `g4c init-random` writes an HF checkpoint (fp32) plus a real Gemma 4 tokenizer.json made from
llama.cpp's vocabulary; g4c compiles it for the host (fp32 and fp16 weights); llama.cpp's
convert_hf_to_gguf.py converts the same checkpoint to GGUF f32/f16; then each engine runs in its own
process (benchmarks/engines.py) with the same thread count and prompt. The memory bandwidth is measured
at the start of every round (g4c.bench.measured_bandwidth; the best is kept, like each engine's best
round) and every decode speed is compared with the roofline bandwidth / bytes read per step.
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
    log(" ".join(map(str, cmd)))
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} {cmd[1]} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


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


def g4c_artifact(ckpt: Path, precision: str) -> Path:
    """Always recompiled: the kernels are what is being measured (checkpoints and GGUFs are cached)."""
    path = ckpt.with_name(f"{ckpt.name}.{precision}.g4c")
    need_disk(ckpt.parent, _size(ckpt) * (1.0 if precision == "f32" else 0.6) / 1e9)
    g4c("compile", ckpt, "--dtype", {"f32": "fp32", "f16": "fp16"}[precision], "-o", path, "--overwrite")
    return path


def gguf(ckpt: Path, precision: str) -> Path:
    path = ckpt.with_name(f"{ckpt.name}.{precision}.gguf")
    if not path.is_file():
        tmp = path.with_suffix(".partial")
        need_disk(ckpt.parent, _size(ckpt) * (1.0 if precision == "f32" else 0.5) / 1e9)
        try:
            run([sys.executable, LLAMA_SRC / "convert_hf_to_gguf.py", ckpt, "--outtype", precision, "--outfile", tmp])
        except BaseException:
            tmp.unlink(missing_ok=True)  # no half-written GGUF left behind
            raise
        tmp.rename(path)
    return path


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


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


def engines_for(model_name: str, ckpt: Path, args, work: Path) -> dict[str, dict]:
    """Every engine on this checkpoint, `args.rounds` times in turn; each number is its best round.

    Shared machines drift by 10-20% within minutes, so one engine measured late would be judged on a
    different machine; interleaving the rounds and keeping each engine's best evens that out."""
    have_llama = (LLAMA_SRC / "convert_hf_to_gguf.py").is_file() and _importable("llama_cpp")
    contexts = args.contexts if model_name == "e2b" else ""
    precisions = (args.precisions if model_name == "e2b" else args.moe_precisions).split(",")
    jobs = {f"g4c {p}": ("g4c", g4c_artifact(ckpt, p), [], contexts if p == "f32" else "") for p in precisions}
    jobs["transformers eager f32"] = ("transformers", ckpt, ["--attn", "eager"], contexts)
    jobs["transformers sdpa f32"] = ("transformers", ckpt, ["--attn", "sdpa"], "")
    if have_llama:
        for p in precisions:
            jobs[f"llama.cpp {p}"] = ("llama.cpp", gguf(ckpt, p), [], "")
            jobs[f"llama.cpp {p} flash-attn"] = ("llama.cpp", gguf(ckpt, p), ["--flash-attn"], "")
    else:
        log("llama.cpp not set up (bash benchmarks/setup_llama_cpp.sh): skipping it")
    rows: dict[str, dict] = {}
    from g4c.bench import measured_bandwidth

    for round_ in range(args.rounds):
        args.bandwidths.append(measured_bandwidth(int(args.threads)))
        log(f"round {round_ + 1}/{args.rounds}: read bandwidth {args.bandwidths[-1]:.1f} GB/s")
        for name, (kind, model, extra, ctx) in jobs.items():
            log(f"round {round_ + 1}/{args.rounds}: {name}")
            result = engine(kind, model, args, work, extra, ctx)
            rows[name] = best_of(rows[name], result) if name in rows else result
    reference = np.load(rows["transformers eager f32"]["logits_file"])
    for row in rows.values():
        if "logits_file" in row:
            row["max_abs_logit_diff_vs_transformers"] = float(np.abs(np.load(row.pop("logits_file")) - reference).max())
    return rows


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
    """Attach decode roofline ratios: tok/s / (bandwidth / bytes read per step at that context)."""
    for model in results["models"].values():
        for name, row in model["engines"].items():
            if "error" in row:
                continue
            precision = "f16" if "f16" in name else "f32"
            g4c_row = model["engines"].get(f"g4c {precision}") or model["engines"]["g4c f32"]
            row["roofline"] = {n: tok_s * int(g4c_row["decode_bytes"][n]) / (bandwidth * 1e9)
                               for n, tok_s in row["decode"].items() if n in g4c_row["decode_bytes"]}


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
        out += [f"## {model['title']}", "",
                "| engine | " + " | ".join(f"prefill {n} tok/s" for n in lens)
                + f" | decode tok/s (ctx {lens[0]}) | roofline | TTFT {lens[0]} (ms) | peak RSS (GB) "
                  "| max abs Δlogits vs transformers |",
                "|---|" + "---|" * (len(lens) + 5)]
        for name, row in model["engines"].items():
            first = lens[0]
            if "error" in row:
                out.append(f"| {name} | failed: {row['error']} |" + " |" * (len(lens) + 4))
                continue
            out.append(f"| {name} | " + " | ".join(f"{row['prefill'][n]:.1f}" for n in lens)
                       + f" | {row['decode'][first]:.2f} | {row['roofline'].get(first, float('nan')):.0%}"
                       + f" | {1e3 * row['ttft_s'][first]:.0f} | {row['peak_rss_mb'] / 1024:.1f}"
                       + f" | {row['max_abs_logit_diff_vs_transformers']:.2e} |")
        g4c_bytes = model["engines"].get("g4c f32", {}).get("decode_bytes", {}).get(lens[0])
        if g4c_bytes:
            out += ["", f"Bytes read per fp32 decode step at context {lens[0]}: {int(g4c_bytes) / 1e9:.2f} GB.", ""]
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
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(6 * (len(models) + 1), 5))
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
    parser.add_argument("--moe-precisions", default="f32",
                        help="MoE slice precisions (f32 alone needs ~30 GB of disk for checkpoint, artifact, GGUF)")
    parser.add_argument("--keep", action="store_true", help="keep checkpoints, artifacts and GGUFs in --work")
    parser.add_argument("--render", type=Path, metavar="RESULTS_JSON",
                        help="only re-render RESULTS.md and the plot from a saved results JSON (e.g. after editing NOTES.md)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--gen", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per engine (best is kept)")
    parser.add_argument("--prompt-lens", default="64,512")
    parser.add_argument("--contexts", default="512,2048,8192,32768")
    parser.add_argument("--precisions", default="f32,f16")
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
    results = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items() if k != "bandwidths"},
               "models": {}}
    for key, (preset, layers, title) in models.items():
        ckpt = checkpoint(args.work, preset, layers)
        results["models"][key] = {"title": title, "engines": engines_for(key, ckpt, args, args.work)}
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
    (args.out / "RESULTS.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
