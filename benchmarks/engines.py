"""One engine, one process: time prefill/decode of a checkpoint and print one JSON object.

benchmarks/compare.py runs this once per engine so every engine gets a fresh process (honest peak RSS,
no shared caches or thread pools) with the same thread count and the same random weights:

    python benchmarks/engines.py g4c ARTIFACT --threads 2 --prompt-lens 64,512 --contexts 512,2048
    python benchmarks/engines.py transformers CKPT --attn eager --threads 2 --prompt-lens 64,512
    python benchmarks/engines.py llama.cpp MODEL.gguf --flash-attn --threads 2 --prompt-lens 64,512
    python benchmarks/engines.py onnxruntime EXPORT/model.onnx --threads 2 --prompt-lens 64,512

Every engine also writes the last-position logits of the first prompt to --logits (a .npy), so
compare.py can report how far each engine is from transformers fp32 on the same input.
Decode at context N (--contexts) starts from a KV cache holding N positions of random keys/values:
the cost of a step depends on how many rows attention reads, not on their values (see g4c/bench.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np


def prompt(vocab: int, length: int) -> list[int]:
    """The same random prompt for every engine (token 2 = <bos> first, like a real request)."""
    return [2] + np.random.default_rng(1234).integers(10, vocab, size=length - 1).tolist()


def median_step(step, first: int, gen: int, warmup: int = 2) -> float:
    """Median seconds of `gen` calls of step(token) -> next token, after `warmup` untimed calls."""
    token = first
    for _ in range(warmup):
        token = step(token)
    times = []
    for _ in range(gen):
        t0 = time.perf_counter()
        token = step(token)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_prompts(args, vocab: int, prefill, step, result: dict, reset=lambda: None) -> None:
    """For each prompt length: `reset()` (untimed), then `prefill(ids)` → the last position's logits, timed
    up to the first token; then decode steps after it. The first prompt's logits go to --logits."""
    for n in args.prompt_lens:
        ids = prompt(vocab, n)
        reset()
        t0 = time.perf_counter()
        logits = prefill(ids)
        first = int(np.argmax(logits))
        elapsed = time.perf_counter() - t0
        result["prefill"][n], result["ttft_s"][n] = n / elapsed, elapsed
        if n == args.prompt_lens[0] and args.logits:
            np.save(args.logits, np.asarray(logits, dtype=np.float32))
        result["decode"][n] = 1 / median_step(step, first, args.gen)


# -- g4c ----------------------------------------------------------------------------------------------
def run_g4c(args) -> dict:
    from g4c.bench import decode_at_context, decode_weight_bytes, kv_read_bytes
    from g4c.runtime import load

    lens, contexts = args.prompt_lens, args.contexts
    session = load(args.model, max_context=max(lens + contexts) + args.gen + 8, prefill_chunk=max(lens))
    vocab = session.vocab_size
    result = {"prefill": {}, "decode": {}, "ttft_s": {}}

    def step(t: int) -> int:
        return int(np.argmax(session.decode(t)))

    session.prefill(prompt(vocab, 8))  # page the weights in
    time_prompts(args, vocab, session.prefill, step, result, reset=session.reset)
    for n in contexts:
        decode_at_context(session, n)
        result["decode"][n] = 1 / median_step(step, 5, args.gen)
    result["decode_weight_bytes"] = decode_weight_bytes(session)  # as stored: quantized blocks + scales
    result["decode_bytes"] = {n: result["decode_weight_bytes"] + kv_read_bytes(session, n)
                              for n in sorted(set(lens + contexts))}
    result["weight_dtype"] = session.manifest.weight_dtype
    result["quant"] = session.manifest.quant
    return result


# -- transformers -------------------------------------------------------------------------------------
def run_transformers(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    device = args.device
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                 attn_implementation=args.attn).eval().to(device)
    vocab = model.config.vocab_size
    result = {"prefill": {}, "decode": {}, "ttft_s": {}, "device": device, "dtype": args.dtype}

    def next_token(out) -> int:
        return int(out.logits[0, -1].argmax())  # int() waits for the GPU

    def tensor(rows):
        return torch.tensor(rows, device=device)

    with torch.inference_mode():
        model(tensor([prompt(vocab, 8)]))  # warm-up
        for n in args.prompt_lens:
            ids = tensor([prompt(vocab, n)])
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            first = next_token(out)
            elapsed = time.perf_counter() - t0
            result["prefill"][n], result["ttft_s"][n] = n / elapsed, elapsed
            if n == args.prompt_lens[0] and args.logits:
                np.save(args.logits, out.logits[0, -1].float().cpu().numpy())
            cache = out.past_key_values

            def step(t: int) -> int:
                return next_token(model(tensor([[t]]), past_key_values=cache, use_cache=True))

            result["decode"][n] = 1 / median_step(step, first, args.gen)
        for n in args.contexts:
            cache = _random_cache(model, n)

            def step(t: int) -> int:
                position = cache.get_seq_length()
                return next_token(model(tensor([[t]]), past_key_values=cache, use_cache=True,
                                        position_ids=tensor([[position]])))

            result["decode"][n] = 1 / median_step(step, 5, args.gen)
    return result


def _random_cache(model, context: int):
    """A transformers cache holding `context` positions of random K/V (sliding layers keep window - 1)."""
    import torch

    out = model(torch.tensor([[2, 5, 6, 7]], device=model.device), use_cache=True)
    cache = out.past_key_values
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None or not layer.is_initialized:
            continue
        rows = min(context, layer.sliding_window - 1) if getattr(layer, "is_sliding", False) else context
        b, h, _, d = layer.keys.shape
        like = {"dtype": layer.keys.dtype, "device": layer.keys.device}
        layer.keys = torch.randn(b, h, rows, d, **like)
        layer.values = torch.randn(b, h, rows, layer.values.shape[-1], **like)
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = context
    return cache


# -- llama.cpp ----------------------------------------------------------------------------------------
def run_llama_cpp(args) -> dict:
    import llama_cpp

    n_ctx = max(args.prompt_lens) + args.gen + 16
    llm = llama_cpp.Llama(model_path=str(args.model), n_ctx=n_ctx, n_batch=max(args.prompt_lens),
                          n_ubatch=max(args.prompt_lens), n_threads=args.threads, n_threads_batch=args.threads,
                          flash_attn=args.flash_attn, logits_all=False, verbose=False)
    vocab = llm.n_vocab()
    result = {"prefill": {}, "decode": {}, "ttft_s": {}}

    def last_logits() -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,)).copy()

    def step(t: int) -> int:
        llm.eval([t])
        return int(np.argmax(last_logits()))

    def prefill(ids: list[int]) -> np.ndarray:
        llm.eval(ids)
        return last_logits()

    llm.eval(prompt(vocab, 8))  # warm-up
    time_prompts(args, vocab, prefill, step, result, reset=llm.reset)  # (eval() drops the cache from n_tokens on)
    return result


# -- onnxruntime (a `g4c export-onnx` model) -------------------------------------------------------------
def run_onnxruntime(args) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    session = ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"])
    pasts = {i.name: i.shape for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    outputs = [o.name for o in session.get_outputs()]
    vocab = session.get_outputs()[0].shape[-1]
    result = {"prefill": {}, "decode": {}, "ttft_s": {}}
    state: dict = {}

    def run(ids: list[int], start: int, past: dict) -> np.ndarray:
        feed = {"input_ids": np.array([ids], np.int64),
                "position_ids": np.arange(start, start + len(ids), dtype=np.int64)[None]}
        feed.update(past)
        out = dict(zip(outputs, session.run(None, feed)))
        state["past"] = {k.replace("present.", "past_key_values."): v for k, v in out.items() if k != "logits"}
        state["position"] = start + len(ids)
        return out["logits"][0, -1]

    def empty(positions: int, rng=None) -> dict:
        make = (lambda shape: rng.standard_normal(shape, dtype=np.float32)) if rng else \
            (lambda shape: np.zeros(shape, np.float32))
        return {name: make((1, shape[1], positions, shape[3])) for name, shape in pasts.items()}

    def step(t: int) -> int:
        return int(np.argmax(run([t], state["position"], state["past"])))

    run(prompt(vocab, 8), 0, empty(0))  # warm-up
    time_prompts(args, vocab, lambda ids: run(ids, 0, empty(0)), step, result)
    for n in args.contexts:  # every layer's cache holds every position (the window is a mask)
        state["past"], state["position"] = empty(n, np.random.default_rng(0)), n
        result["decode"][n] = 1 / median_step(step, 5, args.gen)
    return result


ENGINES = {"g4c": run_g4c, "transformers": run_transformers, "llama.cpp": run_llama_cpp,
           "onnxruntime": run_onnxruntime}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine", choices=ENGINES)
    parser.add_argument("model", help="artifact (g4c), checkpoint directory (transformers) or .gguf (llama.cpp)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--prompt-lens", type=lambda s: [int(x) for x in s.split(",") if x], default=[64])
    parser.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",") if x], default=[])
    parser.add_argument("--gen", type=int, default=16)
    parser.add_argument("--attn", default="eager", help="transformers attention: eager or sdpa")
    parser.add_argument("--device", default="cpu", help="transformers device: cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="transformers weights: float32 or bfloat16")
    parser.add_argument("--flash-attn", action="store_true", help="llama.cpp flash attention")
    parser.add_argument("--logits", help="write the first prompt's last-position logits here (.npy)")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before the TVM runtime starts its thread pool
    t0 = time.time()
    result = ENGINES[args.engine](args)
    from g4c.bench import peak_rss_mb

    result.update(peak_rss_mb=peak_rss_mb(), threads=args.threads, wall_s=round(time.time() - t0, 1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
