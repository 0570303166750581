"""A tuning session and what it buys: `g4c tune` on the E2B-shaped model for a time budget (g4c's
knobs for every kernel, then MetaSchedule sessions on the decode linears while the budget lasts), the
best-so-far speed-up of the tuned kernels against tuning time (from the database's timestamped
records), then `g4c bench` of the model compiled without and with the database (same weights,
threads, one process each).

    python benchmarks/tuning.py [--layers 2 --budget 1800 --threads 2 --db DIR]

Writes benchmarks/results/tuning-HOST.{json,png} and the "Autotuning" section of benchmarks/RESULTS.md
(`compare.py` keeps it when it rewrites the file).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from compare import log, machine  # noqa: E402

BEGIN, END = "<!-- tuning: written by benchmarks/tuning.py -->", "<!-- /tuning -->"


def g4c(*args: str, **kw) -> str:
    done = subprocess.run([sys.executable, "-m", "g4c.cli", *map(str, args)], capture_output=True, text=True, **kw)
    if done.returncode != 0:
        raise RuntimeError(f"g4c {args[0]} failed: {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout


def curve(db: Path) -> tuple[list[dict], dict]:
    """Best-so-far speed-up of the tuned kernels' share of a decode step and a prefill chunk (Σ calls ×
    hand time / the speed-up of the record `g4c compile` would choose from the records so far: confirmed
    records only once a kernel has them), after each record in time order."""
    from g4c.tuning import TuningDB
    from g4c.tuning.database import best_of

    records = sorted(TuningDB(db).records(), key=lambda r: r.when)
    if not records:
        return [], {}
    start = records[0].when
    hand: dict = {}
    for r in records:  # each kernel's first hand-schedule timing and calls per step
        hand.setdefault(r.key, (r.baseline, r.extra.get("calls", {})))
    so_far: dict = {}
    speedup: dict = {}

    def step(bucket: str, speedups: dict) -> float:
        return sum(calls.get(bucket, 0) * baseline[bucket] / speedups.get(key, {}).get(bucket, 1.0)
                   for key, (baseline, calls) in hand.items())

    def ratio(bucket: str) -> float:
        return step(bucket, {}) / step(bucket, speedup) if step(bucket, {}) > 0 else 1.0

    points = []
    for r in records:
        so_far.setdefault(r.key, []).append(r)
        winner = best_of(so_far[r.key])  # its speed-up per bucket, against the hand time measured with it
        speedup[r.key] = {b: winner.baseline[b] / winner.times[b] for b in winner.times} if winner else {}
        points.append({"seconds": r.when - start, "decode": ratio("decode"), "prefill": ratio("prefill")})
    kernels = {r.name: {"knobs": None, "speedup": 1.0} for r in records}
    for rows in so_far.values():
        if (winner := best_of(rows)) is not None:
            kernels[winner.name] = {"knobs": "MetaSchedule trace" if winner.space == "metaschedule" else
                                    winner.candidate, "speedup": round(winner.speedup, 3)}
    return points, kernels


def spaces(db: Path) -> dict[str, int]:
    """Records per search space ("knobs", "metaschedule")."""
    from collections import Counter

    from g4c.tuning import TuningDB

    return dict(Counter(r.space for r in TuningDB(db).records()))


def bench(artifact: Path, threads: int) -> dict:
    out = json.loads(g4c("bench", artifact, "--json", "--threads", threads, "--prompt-len", 64, "--gen", 16))
    return {"prefill": out["prefill_tok_s"], "decode": out["decode_tok_s"]}


def section(results: dict) -> str:
    spaces = ", ".join(f"{n} {space}" for space, n in results.get("spaces", {}).items())
    rows = [BEGIN, "", "## Autotuning (`g4c tune`: g4c's schedule knobs, then MetaSchedule)", "",
            f"{results['model']}, {results['threads']} threads, tuning budget {results['budget']:.0f} s "
            f"({results['records']} candidates measured: {spaces}). Best-so-far speed-up of the tuned kernels' share of a "
            f"step: decode ×{results['final']['decode']:.3f}, prefill chunk ×{results['final']['prefill']:.3f} "
            f"(plot: `{results['plot']}`).", "",
            "`g4c bench` of the model compiled both ways, one run each (this machine's run-to-run noise is "
            "±10-25%: compare the kernel speed-ups, measured best-of-5 in the same process):", "",
            "| model compiled | prefill 64 tok/s | decode tok/s |", "|---|---|---|",
            f"| hand schedules | {results['hand']['prefill']:.1f} | {results['hand']['decode']:.2f} |",
            f"| --tuning-db | {results['tuned']['prefill']:.1f} | {results['tuned']['decode']:.2f} |", "",
            "| kernel | speed-up | knobs |", "|---|---|---|"]
    rows += [f"| {name} | {k['speedup']:.2f}× | {k['knobs'] or 'hand schedule'} |"
             for name, k in sorted(results["kernels"].items(), key=lambda kv: -kv[1]["speedup"])]
    return "\n".join(rows + ["", END, ""])


def write_section(text: str, path: Path = HERE / "RESULTS.md") -> None:
    old = path.read_text() if path.is_file() else ""
    old = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END) + r"\n?", "", old, flags=re.S).rstrip() + "\n\n"
    path.write_text(old + text)


def plot(points: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for bucket in ("decode", "prefill"):
        ax.step([p["seconds"] / 60 for p in points], [p[bucket] for p in points], where="post", label=bucket)
    ax.set_xlabel("tuning time (min)")
    ax.set_ylabel("best-so-far speed-up of the tuned kernels")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--budget", type=float, default=1800)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--db", type=Path, help="an existing database to report on (no tuning run)")
    args = parser.parse_args()
    model = ["e2b", "--random-weights", "--layers", str(args.layers)]
    env = {**os.environ, "TVM_NUM_THREADS": str(args.threads)}
    work = Path(tempfile.mkdtemp(prefix="g4c-tuning-"))
    db = args.db or work / "db"
    if args.db is None:
        log(f"tuning for {args.budget:.0f} s into {db}")
        g4c("tune", *model, "--db", db, "--time-budget", args.budget, "--metaschedule-trials", 32, env=env)
    points, kernels = curve(db)
    results = {"machine": machine(), "model": f"E2B-shaped, {args.layers} layers", "threads": args.threads,
               "budget": args.budget, "records": len(points), "points": points, "kernels": kernels,
               "final": points[-1] if points else {"decode": 1.0, "prefill": 1.0}, "spaces": spaces(db)}
    for label, extra in (("hand", []), ("tuned", ["--tuning-db", db])):
        artifact = work / label
        g4c("compile", *model, "-o", artifact, "--no-check", "--no-embed", *extra, env=env)
        results[label] = bench(artifact, args.threads)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    stem = f"tuning-{results['machine']['host']}"
    results["plot"] = f"results/{stem}.png"
    plot(points, out / f"{stem}.png")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    write_section(section(results))
    print(section(results))


if __name__ == "__main__":
    main()
