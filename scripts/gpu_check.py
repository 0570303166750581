"""GPU verification of compiled g4c artifacts (run by scripts/gpu_check.sh on the GPU machine).

1. Parity: each test checkpoint's artifact against transformers (fp32, eager) on the same GPU: max
   |Δlogits| over a 20-token prompt (≤ 1e-4) and 32 greedy tokens (identical); the C runtime
   (examples/generate.c linked with the `e` artifact's lib/libg4c.so) against the Python runtime.
2. Benchmark: the E2B-shaped artifact (bf16 weights regenerated from the seed) against transformers
   eager and sdpa with the same weights (written by `g4c init-random` with the same seed): prefill and
   decode tok/s, and the decode roofline ratio = bytes one decode step reads / step time / bandwidth,
   with the bandwidth measured here (device-to-device copy through torch) and the H100's nominal peak.

Only the g4c runtime runs g4c here: tvm_ffi, numpy and the TVM runtime libraries bundled in the
artifacts. torch is used for transformers and the bandwidth measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROMPT = [2, 17, 99, 5, 8, 1, 44, 23, 60, 7, 9, 31, 12, 250, 3, 77, 101, 18, 64, 200]  # tests/conftest.py
NOMINAL_HBM = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s, SXM parts
ROOT = Path(__file__).resolve().parents[1]


def torch_device() -> str:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 reference means fp32
    torch.backends.cudnn.allow_tf32 = False
    return "cuda" if torch.cuda.is_available() else "cpu"


def parity(bundle: Path) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from g4c.runtime import load

    device, rows = torch_device(), []
    for family in ("e", "moe", "dense"):
        model = AutoModelForCausalLM.from_pretrained(bundle / "checkpoints" / family, dtype=torch.float32,
                                                     attn_implementation="eager").eval().to(device)
        with torch.no_grad():
            ref = model(torch.tensor([PROMPT], device=device), output_hidden_states=True).logits[0]
            greedy_ref = model.generate(torch.tensor([PROMPT[:6]], device=device), max_new_tokens=32,
                                        do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True)
        session = load(bundle / "artifacts" / family)
        logits = session.prefill(PROMPT, all_logits=True)
        session.reset()
        greedy = session.generate(PROMPT[:6], 32)
        diff = float(np.abs(logits - ref.float().cpu().numpy()).max())
        same = greedy == greedy_ref[0, len(PROMPT[:6]):].tolist()
        rows.append({"family": family, "target": session.manifest.target, "max_abs_dlogits": diff,
                     "greedy_identical": same, "ok": diff <= 1e-4 and same})
        print(f"parity {family}: max |Δlogits| {diff:.2e}, greedy 32 {'identical' if same else 'DIFFERENT'}")
        if (bundle / "generate-c").is_file() and (bundle / "artifacts" / family / "lib").is_dir():
            rows.append(c_parity(bundle, family, logits[-1], greedy))
    return rows


def c_parity(bundle: Path, family: str, last_logits: np.ndarray, greedy: list[int]) -> dict:
    """The C runtime (examples/generate.c, prebuilt by gpu_prepare.sh, linked with the artifact's
    lib/libg4c.so) on the same artifact: the Python runtime's last-token logits and greedy tokens."""
    import tempfile

    art, row = bundle / "artifacts" / family, {"family": f"{family} (C runtime)", "target": "", "ok": False,
                                               "max_abs_dlogits": float("inf"), "greedy_identical": False}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "logits.bin"
        logits_run = subprocess.run([str(bundle / "generate-c"), str(art), ",".join(map(str, PROMPT)), "1",
                                     "--logits", str(out)], capture_output=True, text=True)
        tokens_run = subprocess.run([str(bundle / "generate-c"), str(art), ",".join(map(str, PROMPT[:6])), "32",
                                     "--ignore-eos"], capture_output=True, text=True)
        if logits_run.returncode or tokens_run.returncode:
            print(f"C runtime {family}: FAILED {(logits_run.stderr + tokens_run.stderr).strip()[-500:]}")
            return row
        diff = float(np.abs(np.fromfile(out, dtype=np.float32) - last_logits).max())
    same = [int(t) for t in tokens_run.stdout.strip().splitlines()[-1].split(",")] == greedy
    named = tokens_run.stderr.split(" artifact", 1)[0].rsplit("· ", 1)[-1]  # "g4c … · cuda:sm_90 artifact, …"
    row.update(target=named, max_abs_dlogits=diff, greedy_identical=same,
               ok=diff <= 1e-5 and same)
    print(f"C runtime {family}: max |Δlogits| vs the Python runtime {diff:.2e}, greedy 32 "
          f"{'identical' if same else 'DIFFERENT'}; {tokens_run.stderr.strip().splitlines()[-1]}")
    return row


def bandwidth() -> dict:
    """Device-to-device copy bandwidth (bytes read + written per second), best of 20 1-GiB copies."""
    import torch

    if not torch.cuda.is_available():
        return {"measured": None, "nominal": None, "name": "cpu"}
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(20):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        y.copy_(x)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    name = torch.cuda.get_device_name()
    nominal = next((v for k, v in NOMINAL_HBM.items() if k in name), None)
    return {"measured": 2 * x.numel() / best, "nominal": nominal, "name": name}


def engine(*args: str) -> dict:
    command = [sys.executable, str(ROOT / "benchmarks" / "engines.py"), *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def benchmark(bundle: Path, prompt_lens: str, gen: int, context: int) -> dict:
    artifact = bundle / "artifacts" / "e2b"
    manifest = json.loads((artifact / "manifest.json").read_text())
    layers = manifest["config"]["num_hidden_layers"]
    checkpoint = Path(os.environ.get("G4C_E2B_CHECKPOINT", "/tmp/g4c-e2b-checkpoint"))
    if not (checkpoint / "config.json").is_file():  # transformers gets the same weights: same seed
        subprocess.run([sys.executable, "-m", "g4c.cli", "init-random", "e2b", "--seed",
                        str(manifest["weights_from_seed"]["seed"]), "--layers", str(layers), "-o", str(checkpoint)],
                       check=True)
    device = torch_device()
    common = ["--prompt-lens", prompt_lens, "--gen", str(gen), "--contexts", str(context)]
    results = {"g4c": engine("g4c", str(artifact), *common)}
    for attn in ("eager", "sdpa"):
        results[f"transformers {attn}"] = engine("transformers", str(checkpoint), *common, "--device", device,
                                                 "--dtype", "bfloat16", "--attn", attn)
    return {"layers": layers, "weight_dtype": manifest["weight_dtype"], "results": results,
            "decode_graph": manifest.get("decode_graph")}


def report(rows: list[dict], bench: dict | None, bw: dict) -> str:
    lines = ["## Parity (fp32, test checkpoints)", "", "| family | target | max abs Δlogits | greedy 32 |",
             "|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['target']} | {r['max_abs_dlogits']:.2e} | "
              f"{'identical' if r['greedy_identical'] else 'different'} |" for r in rows]
    if bench:
        g4c = bench["results"]["g4c"]
        lines += ["", f"## E2B-shaped, {bench['layers']} layers, {bench['weight_dtype']} weights, {bw['name']}", "",
                  f"bandwidth: measured copy {bw['measured'] / 1e12:.2f} TB/s" if bw["measured"] else "bandwidth: n/a",
                  "", "| engine | prefill tok/s | decode tok/s | decode vs transformers eager | roofline (measured / nominal) |",
                  "|---|---|---|---|---|"]
        eager = bench["results"]["transformers eager"]
        for name, r in bench["results"].items():
            first = str(min(int(k) for k in r["prefill"]))
            prefill = " / ".join(f"{v:.0f}" for v in r["prefill"].values())
            decode = r["decode"][first]
            ratio = decode / eager["decode"][first]
            roof = ""
            if bw["measured"]:
                step_bytes = g4c["decode_bytes"][first]
                roof = f"{step_bytes * decode / bw['measured']:.0%}"
                if bw["nominal"]:
                    roof += f" / {step_bytes * decode / bw['nominal']:.0%}"
            lines.append(f"| {name} | {prefill} | {decode:.1f} | {ratio:.2f}× | {roof} |")
        if bench.get("decode_graph"):
            lines += ["", "g4c decode step: {captured} kernels replayed as one CUDA graph, {outside} launched "
                      "outside it".format(**bench["decode_graph"])]
        lines += ["", f"decode at the first prompt length; decode over {max(int(k) for k in g4c['decode'])} "
                  "cached positions: " + ", ".join(f"{n}: {r['decode'][max(r['decode'], key=int)]:.1f}"
                                                   for n, r in bench["results"].items())]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--prompt-lens", default="64,512")
    parser.add_argument("--gen", type=int, default=32)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--skip-benchmark", action="store_true")
    parser.add_argument("--skip-parity", action="store_true")
    args = parser.parse_args()
    rows = [] if args.skip_parity else parity(args.bundle)
    bw = bandwidth()
    bench = None if args.skip_benchmark else benchmark(args.bundle, args.prompt_lens, args.gen, args.context)
    text = report(rows, bench, bw)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.md").write_text(text)
        (args.out / "gpu_check.json").write_text(json.dumps({"parity": rows, "bandwidth": bw, "benchmark": bench},
                                                            indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
