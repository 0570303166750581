"""Measure a compiled artifact: prefill/decode speed, time to first token, memory and the decode roofline.

Imports only numpy and the compiler-free runtime (the TVM compiler only if it is installed, for one
bandwidth kernel), so `g4c bench ARTIFACT` also runs on a device.

Decode is memory-bound: one step reads every weight the decode program touches (an embedding table
gathered by one row costs one row, the tied LM head costs the whole table) plus the KV rows attention
reads. The roofline ratio is that byte count / step time / memory bandwidth, and the bandwidth is
measured in the same run (`measured_bandwidth`): the best rate among multi-threaded numpy/BLAS reads
of a buffer far larger than the caches and g4c's own GEMV kernel streaming 1 GiB. Single-stream
reductions (a `sum`) under-report what a GEMV with several weight rows in flight per thread reaches,
which is how an engine could "beat" a roofline measured with `torch.sum`.

Context scaling: decode at context N needs N positions in the KV cache, but prefilling 32K tokens on a
CPU takes many minutes. The cost of a decode step depends on how many cache rows attention reads, not
on their values, so `decode_at_context` fills the caches with random keys/values and starts decoding
at position N. Sliding layers read at most their window; only global layers grow with N.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

GATHER_OPS = ("embed", "embed_rows", "embed_q")  # read one row per token of their tables
MOE_OPS = ("moe_experts", "moe_experts_qdot", "moe_gate_up", "moe_down")  # one token reads top_k of the experts' weights


@dataclass
class BenchResult:
    prompt_len: int
    gen: int
    context: int
    threads: int
    prefill_tok_s: float
    ttft_s: float
    decode_tok_s: float
    decode_step_ms: float
    decode_bytes: int
    kv_bytes: int
    weight_bytes: int
    bandwidth_gb_s: float
    roofline_tok_s: float
    roofline_ratio: float
    peak_rss_mb: float
    profile: dict[str, list[dict]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def read_bandwidth(threads: int, megabytes: int = 1024, repeats: int = 5) -> float:
    """Best sustained read bandwidth (GB/s): `threads` threads each stream a disjoint slice of one buffer
    through three read kernels (float sum, 64-bit OR reduction, BLAS GEMV against a vector); the best
    rate any of them reaches is the machine's, the others are limited by their arithmetic."""
    data = np.ones(megabytes * (1 << 20) // 4, dtype=np.float32)
    rows = np.array_split(data.reshape(-1, 1024), threads)
    vector = np.ones(1024, dtype=np.float32)
    kernels = [(np.sum, [r.reshape(-1) for r in rows]),
               (np.bitwise_or.reduce, [r.reshape(-1).view(np.uint64) for r in rows]),
               (vector.__rmatmul__, rows)]
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for kernel, slices in kernels:
            list(pool.map(kernel, slices))  # fault the pages in, start the threads
            for _ in range(repeats):
                t0 = time.perf_counter()
                list(pool.map(kernel, slices))
                best = max(best, data.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def gemv_bandwidth(megabytes: int = 1024, repeats: int = 5) -> float:
    """Read rate (GB/s) of g4c's own host GEMV kernel (on $TVM_NUM_THREADS threads) over a `megabytes`
    fp32 matrix: with a
    cache-resident input vector, a GEMV is a pure stream of the matrix, and its multi-row schedule
    (8 weight rows in flight per thread) reads faster than single-stream reductions. Needs the TVM
    compiler; 0.0 where it is not installed (devices), so the numpy kernels decide there."""
    try:
        import tvm
    except ImportError:
        return 0.0
    from g4c.artifact import aligned_empty
    from g4c.codegen.spec import KernelSpec
    from g4c.targets.registry import host_target

    k = 1536
    n = megabytes * (1 << 20) // 4 // k
    target = host_target()
    spec = KernelSpec.of("linear", k=k, n=n, dtype="float32", rows=None)
    func = tvm.compile(tvm.IRModule({"main": target.kernel(spec)}), target=target.tvm_target())["main"]

    # numpy buffers like the runtime's weights (numpy asks for transparent huge pages on big arrays)
    arrays = [aligned_empty(shape, np.float32) for shape in ((1, k), (n, k), (1, n))]
    for a in arrays:
        a.fill(1.0)
    x, w, y = (tvm.runtime.from_dlpack(a) for a in arrays)
    func(x, w, y)
    best = min(_timed(lambda: func(x, w, y)) for _ in range(repeats))
    return n * k * 4 / best / 1e9


def _timed(call) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def measured_bandwidth(threads: int) -> float:
    """The machine's read bandwidth for the roofline: the best of the numpy/BLAS kernels and g4c's GEMV."""
    return max(read_bandwidth(threads), gemv_bandwidth())


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def decode_weight_bytes(session) -> int:
    """Bytes of weights one decode step reads, from the decode program's steps (an expert bank costs
    its top_k / experts share: a token reads only its selected experts)."""
    read: dict[str, int] = {}
    manifest = session.manifest
    for step in manifest.programs["decode"].steps:
        spec = manifest.kernels.get(step.kernel, {"op": step.kernel})
        for arg in step.args:
            if not arg.startswith("w:"):
                continue
            name = arg[2:]
            tensor = session.weights[name]
            if spec["op"] in GATHER_OPS:
                cost = tensor[0].nbytes
            elif spec["op"] in MOE_OPS:
                cost = int(tensor.nbytes * spec["top_k"] / spec["experts"])
            else:
                cost = tensor.nbytes
            read[name] = max(read.get(name, 0), cost)
    return sum(read.values())


def kv_read_bytes(session, context: int) -> int:
    """KV bytes attention reads in one decode step at `context` cached positions."""
    total = 0
    for slot, (_, heads, dim) in session.cache_shapes.items():
        info = session.manifest.kv_slots[slot]
        rows = min(context + 1, info.window) if info.ring else context + 1
        total += rows * heads * dim * 4
    return total


def kv_cache_bytes(session) -> int:
    return sum(int(np.prod(shape)) * 4 for shape in session.cache_shapes.values())


def decode_at_context(session, context: int, seed: int = 0) -> None:
    """Put the session at position `context` with random cache contents (see the module docstring)."""
    rng = np.random.default_rng(seed)
    for cache in session.caches.values():
        cache[...] = rng.standard_normal(cache.shape, dtype=np.float32)
    session.position = context


class KernelProfiler:
    """Per-kernel wall time of the Relax VM calls, through the VM's instrument hook."""

    def __init__(self, session):
        self.session = session
        self.times: dict[str, list[float]] = {}
        self._start = 0.0

    def __enter__(self) -> "KernelProfiler":
        import tvm_ffi

        self.session.executor.vm["set_instrument"](tvm_ffi.convert(self._instrument))
        return self

    def __exit__(self, *exc) -> None:
        self.session.executor.vm["set_instrument"](None)

    def _instrument(self, func, symbol: str, before: bool, ret, *args) -> int:
        now = time.perf_counter()
        if before:
            self._start = now
        else:
            self.times.setdefault(str(symbol), []).append(now - self._start)
        return 0  # VMInstrumentReturnKind.kNoOp: run the call

    def report(self, steps: int) -> list[dict]:
        total = sum(sum(t) for t in self.times.values())
        rows = [{"kernel": name, "calls_per_step": len(ts) // steps, "ms_per_step": 1e3 * sum(ts) / steps,
                 "share": sum(ts) / total} for name, ts in self.times.items()]
        return sorted(rows, key=lambda r: -r["ms_per_step"])


def bench_session(session, prompt_len: int, gen: int, context: int, threads: int,
                  bandwidth_gb_s: float, profile: bool = False, warmup: int = 2) -> BenchResult:
    """Time prefill of `prompt_len` random tokens from position 0, then `gen` decode steps at `context`.
    With `profile`, one more prefill and `gen` more decode steps run under the kernel profiler (kept out
    of the timed runs: the hook costs a Python call per VM instruction)."""
    prompt = np.random.default_rng(0).integers(0, session.vocab_size, size=prompt_len).tolist()
    session.prefill(prompt[: min(8, prompt_len)])  # warm-up: first calls page the weights in
    session.reset()
    t0 = time.perf_counter()
    token = int(np.argmax(session.prefill(prompt)))
    ttft = time.perf_counter() - t0
    if context > prompt_len:
        decode_at_context(session, context)
    position = session.position
    for _ in range(warmup):
        session.decode(token)
    session.position = position
    steps = [_timed(lambda: session.decode(token)) for _ in range(gen)]
    step = statistics.median(steps)
    weights = decode_weight_bytes(session)
    read = weights + kv_read_bytes(session, position + gen // 2)
    roofline = bandwidth_gb_s * 1e9 / read
    return BenchResult(prompt_len=prompt_len, gen=gen, context=max(context, prompt_len), threads=threads,
                       prefill_tok_s=prompt_len / ttft, ttft_s=ttft, decode_tok_s=1 / step,
                       decode_step_ms=1e3 * step, decode_bytes=read, kv_bytes=kv_cache_bytes(session),
                       weight_bytes=weights, bandwidth_gb_s=bandwidth_gb_s, roofline_tok_s=roofline,
                       roofline_ratio=(1 / step) / roofline, peak_rss_mb=peak_rss_mb(),
                       profile=_profile(session, prompt, position, gen) if profile else {})


def _profile(session, prompt: list[int], position: int, gen: int) -> dict[str, list[dict]]:
    report = {}
    session.reset()
    with KernelProfiler(session) as profiler:
        session.prefill(prompt)
    report["prefill"] = profiler.report(1)
    session.position = position
    with KernelProfiler(session) as profiler:
        for _ in range(gen):
            session.decode(5)
            session.position = position
    report["decode"] = profiler.report(gen)
    return report


def format_result(r: BenchResult) -> str:
    lines = [f"prefill   {r.prefill_tok_s:9.1f} tok/s   ({r.prompt_len} tokens, time to first token {r.ttft_s * 1e3:.0f} ms)",
             f"decode    {r.decode_tok_s:9.2f} tok/s   (median of {r.gen} steps at context {r.context}, "
             f"{r.decode_step_ms:.1f} ms/step)",
             f"roofline  {r.roofline_ratio:9.1%}         ({r.decode_bytes / 1e9:.3f} GB read per step "
             f"[{r.weight_bytes / 1e9:.3f} weights], {r.bandwidth_gb_s:.1f} GB/s measured read bandwidth "
             f"→ {r.roofline_tok_s:.2f} tok/s)",
             f"memory    {r.peak_rss_mb:9.0f} MB peak RSS, KV cache {r.kv_bytes / 1e6:.1f} MB, {r.threads} threads"]
    for phase, rows in r.profile.items():
        lines.append(f"{phase + ' kernel':44s} {'calls':>6s} {'ms':>9s} {'share':>7s}")
        lines += [f"{p['kernel'][:44]:44s} {p['calls_per_step']:6d} {p['ms_per_step']:9.3f} {p['share']:7.1%}"
                  for p in rows[:15]]
    return "\n".join(lines)
