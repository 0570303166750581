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
    t0 = time.time()
    loaded = load_model(str(ckpt))
    artifact = compile_model(loaded.cfg, loaded.weights, "llvm", work / "artifact")
    compile_s = time.time() - t0
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, size=args.prompt_len).tolist()

    session = load(artifact, prefill_chunk=args.prompt_len)
    session.prefill(prompt[:8])  # warm-up
    session.reset()
    t0 = time.perf_counter()
    logits = session.prefill(prompt)
    g4c_prefill = args.prompt_len / (time.perf_counter() - t0)
    steps = []
    token = int(np.argmax(logits))
    for _ in range(args.gen):
        t0 = time.perf_counter()
        token = int(np.argmax(session.decode(token)))
        steps.append(time.perf_counter() - t0)
    g4c_decode = 1 / statistics.median(steps)

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

    result = {"preset": args.preset, "layers": args.layers, "prompt_len": args.prompt_len, "gen": args.gen,
              "threads": args.threads, "compile_s": round(compile_s, 1),
              "g4c": {"prefill_tok_s": round(g4c_prefill, 2), "decode_tok_s": round(g4c_decode, 2)},
              "transformers_eager": {"prefill_tok_s": round(hf_prefill, 2), "decode_tok_s": round(hf_decode, 2)},
              "ratio_prefill": round(g4c_prefill / hf_prefill, 3), "ratio_decode": round(g4c_decode / hf_decode, 3)}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.preset} x{args.layers} layers, fp32, {args.threads} threads, prompt {args.prompt_len}, "
          f"{args.gen} decode steps (compile {compile_s:.0f} s)")
    print(f"{'engine':22s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
    print(f"{'g4c (llvm artifact)':22s} {g4c_prefill:14.2f} {g4c_decode:13.2f}")
    print(f"{'transformers eager':22s} {hf_prefill:14.2f} {hf_decode:13.2f}")
    print(f"{'ratio g4c/transformers':22s} {result['ratio_prefill']:14.3f} {result['ratio_decode']:13.3f}")


if __name__ == "__main__":
    main()
