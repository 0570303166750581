"""The C runtime next to the Python runtime on the same artifact: library size, load time, prefill and
decode speed and peak memory of `examples/generate.c` linked with the artifact's lib/libg4c.so, against
`g4c.load` in Python, on the E2B-shaped benchmark model (real layer sizes, 10 layers, random weights),
same threads, interleaved rounds (best kept).

    python benchmarks/embed.py [--layers 10 --precisions f32,q4 --threads 2 --rounds 2]

Writes benchmarks/results/embed-HOST.json and the "C runtime" section of benchmarks/RESULTS.md
(`compare.py` keeps that section when it rewrites the file).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compare import EMBED_BEGIN as BEGIN, EMBED_END as END, checkpoint, g4c, log, machine  # noqa: E402

EXAMPLE = HERE.parent / "examples" / "generate.c"

PYTHON_RUN = """
import json, sys, time
t0 = time.perf_counter()
import g4c
session = g4c.load(sys.argv[1])
t1 = time.perf_counter()
ids = [int(t) for t in sys.argv[2].split(",")]
logits = session.prefill(ids)
t2 = time.perf_counter()
token, steps = int(logits.argmax()), []
for _ in range(int(sys.argv[3]) - 1):
    t = time.perf_counter()
    token = int(session.decode(token).argmax())
    steps.append(time.perf_counter() - t)
print(json.dumps({"load_ms": (t1 - t0) * 1e3, "prefill": len(ids) / (t2 - t1), "decode": len(steps) / sum(steps)}))
"""


def finished(command: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed: {done.stderr.strip().splitlines()[-1:]}")
    return done


def run_c(app: Path, art: Path, ids: str, gen: int, env: dict, verify: bool = True) -> dict:
    flags = [] if verify else ["--no-verify"]
    done = finished([str(app), str(art), ids, str(gen), "--ignore-eos", *flags], env)
    load = float(re.search(r"loaded in ([\d.]+) ms", done.stderr).group(1))
    speed = re.search(r"prefill \d+ tokens: ([\d.]+) tok/s · decode: ([\d.]+) tok/s", done.stderr)
    return {"load_ms": load, "prefill": float(speed.group(1)), "decode": float(speed.group(2))}


def run_python(art: Path, ids: str, gen: int, env: dict) -> dict:
    done = finished([sys.executable, "-c", PYTHON_RUN, str(art), ids, str(gen)], env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss(command: list[str], env: dict) -> float:
    """Peak RSS (GB) of a command: its VmHWM, polled from /proc while it runs."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    peak = 0
    while process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
            peak = max(peak, int(re.search(r"VmHWM:\s+(\d+)", status).group(1)))
        except (OSError, AttributeError):
            pass
        time.sleep(0.05)
    return peak / 1e6


def best(rows: list[dict]) -> dict:
    return {"load_ms": min(r["load_ms"] for r in rows), "prefill": max(r["prefill"] for r in rows),
            "decode": max(r["decode"] for r in rows)}


def section(results: dict) -> str:
    lines = [BEGIN, "", f"## C runtime (`examples/generate.c` + lib/libg4c.so) vs the Python runtime", "",
             f"{results['title']}; prompt {results['prompt_len']} tokens, {results['gen']} greedy tokens, "
             f"{results['threads']} threads, best of {results['rounds']} interleaved rounds; load = open the "
             "artifact (both check the SHA-256 of every file, the C runtime on the CPU's SHA instructions, unless "
             "`--no-verify`; both map the weights and use them in place); prefill = one 64-token chunk, "
             "decode = the mean over the steps after it; peak RSS of the whole process.", "",
             "| precision | runtime | library MB (libg4c.so / lib/ total) | load ms | prefill tok/s | "
             "decode tok/s | peak RSS GB |", "|---|---|---|---|---|---|---|"]
    for precision, row in results["rows"].items():
        lib = f"{row['libg4c_mb']:.2f} / {row['lib_mb']:.1f}"
        c, c_fast, py = row["c"], row["c_no_verify"], row["python"]
        lines.append(f"| {precision} | C | {lib} | {c['load_ms']:.0f} ({c_fast['load_ms']:.0f} with --no-verify) | "
                     f"{c['prefill']:.1f} | {c['decode']:.2f} | {row['c_rss_gb']:.2f} |")
        lines.append(f"| {precision} | Python | – | {py['load_ms']:.0f} | {py['prefill']:.1f} | {py['decode']:.2f} | "
                     f"{row['python_rss_gb']:.2f} |")
    return "\n".join(lines + ["", END, ""])


def write_section(results: dict, path: Path = HERE / "RESULTS.md") -> None:
    text = path.read_text() if path.is_file() else ""
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END) + r"\n?", "", text, flags=re.S).rstrip() + "\n\n"
    path.write_text(text + section(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--precisions", default="f32,q4")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("G4C_CACHE", Path.home() / ".cache" / "g4c")) / "bench")
    args = parser.parse_args()
    env = {**os.environ, "TVM_NUM_THREADS": str(args.threads)}
    ckpt = checkpoint(args.work, "e2b", args.layers)
    ids = ",".join(str(2 + (7 * i) % 1000) for i in range(args.prompt_len))
    results = {"machine": machine(), "title": f"E2B-shaped, {args.layers} layers", "threads": args.threads,
               "prompt_len": args.prompt_len, "gen": args.gen, "rounds": args.rounds, "rows": {}}
    for precision in args.precisions.split(","):
        art = ckpt.with_name(f"{ckpt.name}.{precision}.embed.g4c")
        flags = ["--quant", precision] if precision in ("q8", "q4") else ["--dtype", {"f32": "fp32", "f16": "fp16"}[precision]]
        log(f"compiling {art.name}")
        g4c("compile", ckpt, *flags, "-o", art, "--overwrite", "--no-check")
        app = art / "generate"
        pkg = subprocess.run(["pkg-config", "--cflags", "--libs", "g4c"], capture_output=True, text=True, check=True,
                             env={**os.environ, "PKG_CONFIG_PATH": str(art / "lib" / "pkgconfig")}).stdout.split()
        subprocess.run(["gcc", "-O2", "-std=c99", "-D_POSIX_C_SOURCE=200809L", str(EXAMPLE), "-o", str(app), *pkg],
                       check=True)
        c, c_fast, py = [], [], []
        for round_ in range(args.rounds):
            log(f"{precision} round {round_ + 1}/{args.rounds}")
            c.append(run_c(app, art, ids, args.gen, env))
            py.append(run_python(art, ids, args.gen, env))
            c_fast.append(run_c(app, art, ids, args.gen, env, verify=False))
        lib = art / "lib"
        results["rows"][precision] = {
            "c": best(c), "c_no_verify": best(c_fast), "python": best(py),
            "libg4c_mb": (lib / "libg4c.so").stat().st_size / 1e6,
            "lib_mb": sum(f.stat().st_size for f in lib.iterdir() if f.is_file()) / 1e6,
            "c_rss_gb": peak_rss([str(app), str(art), ids, str(args.gen), "--ignore-eos"], env),
            "python_rss_gb": peak_rss([sys.executable, "-c", PYTHON_RUN, str(art), ids, str(args.gen)], env)}
        shutil.rmtree(art)
    out = HERE / "results" / f"embed-{results['machine']['host']}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    write_section(results)
    print(section(results))


if __name__ == "__main__":
    main()
