"""Prefill and decode speed of a compiled g4c artifact vs transformers eager, same random weights.

One run, one machine, same thread count: writes an E2B-shaped random checkpoint (real layer sizes,
depth cut with --layers, keeping the sliding:global pattern and a KV-shared tail), compiles it for
the host (`llvm`), then times both engines and prints tok/s and the g4c/transformers ratios.

    python benchmarks/decode_vs_transformers.py --layers 4 --prompt-len 64 --gen 16 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="e2b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="g4c weight storage dtypes to time (transformers runs fp32)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from g4c.checkpoint import write_random_checkpoint
    from g4c.codegen.build import compile_model
    from g4c.model import load_model
    from g4c.presets import preset_config
    from g4c.runtime.artifact import load

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="g4c-bench-"))
    cfg = preset_config(args.preset, args.layers)
    ckpt = write_random_checkpoint(cfg, work / "ckpt", seed=0, dtype="float32")
    loaded = load_model(str(ckpt))
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, size=args.prompt_len).tolist()
    g4c_rows, compile_s = {}, {}
    for dtype in args.dtypes.split(","):
        t0 = time.time()
        artifact = compile_model(loaded.cfg, loaded.weights, "llvm", work / f"artifact-{dtype}", dtype=dtype)
        compile_s[dtype] = round(time.time() - t0, 1)
        g4c_rows[dtype] = _time_g4c(load(artifact, prefill_chunk=args.prompt_len), prompt, args.gen)
        del artifact

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        model(ids[:, :8])  # warm-up
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        hf_prefill = args.prompt_len / (time.perf_counter() - t0)
        past, token, steps = out.past_key_values, out.logits[:, -1:].argmax(-1), []
        for _ in range(args.gen):
            t0 = time.perf_counter()
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - t0)
    hf_decode = 1 / statistics.median(steps)

    rows = {f"g4c llvm {d} weights": r for d, r in g4c_rows.items()}
    rows["transformers eager fp32"] = (hf_prefill, hf_decode)
    result = {"preset": args.preset, "layers": args.layers, "prompt_len": args.prompt_len, "gen": args.gen,
              "threads": args.threads, "compile_s": compile_s,
              "engines": {k: {"prefill_tok_s": round(p, 2), "decode_tok_s": round(d, 2)} for k, (p, d) in rows.items()},
              "ratios_vs_transformers": {k: {"prefill": round(p / hf_prefill, 3), "decode": round(d / hf_decode, 3)}
                                         for k, (p, d) in rows.items()}}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.preset} x{args.layers} layers, {args.threads} threads, prompt {args.prompt_len}, "
          f"{args.gen} decode steps (compile s: {compile_s})")
    print(f"{'engine':28s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'prefill ratio':>14s} {'decode ratio':>13s}")
    for name, (p, d) in rows.items():
        print(f"{name:28s} {p:14.2f} {d:13.2f} {p / hf_prefill:14.3f} {d / hf_decode:13.3f}")


def _time_g4c(session, prompt: list[int], gen: int) -> tuple[float, float]:
    import numpy as np

    session.prefill(prompt[:8])  # warm-up
    session.reset()
    t0 = time.perf_counter()
    logits = session.prefill(prompt)
    prefill = len(prompt) / (time.perf_counter() - t0)
    steps, token = [], int(np.argmax(logits))
    for _ in range(gen):
        t0 = time.perf_counter()
        token = int(np.argmax(session.decode(token)))
        steps.append(time.perf_counter() - t0)
    return prefill, 1 / statistics.median(steps)


if __name__ == "__main__":
    main()
