"""Equivalence check: a pass pipeline changes no numbers.

Runs the reference interpreter on the original and the optimized graphs — a prefill chunk, a second
chunk, then decode steps, with random token ids — and reports the largest logit difference. Every pass
is tested with it on the checkpoint families and on fuzzed configs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from g4c.config import ModelConfig
from g4c.frontend import build_graph
from g4c.ir import Graph, Interpreter, KVState
from g4c.passes.manager import PassContext, PassManager


@dataclass
class Equivalence:
    max_abs_diff: float
    steps: int
    nodes_before: dict[str, int]
    nodes_after: dict[str, int]


def _run_sequence(prefill: Graph, decode: Graph, weights, chunks: Sequence[np.ndarray],
                  decode_tokens: Sequence[int]) -> list[np.ndarray]:
    state, out = KVState(), []
    for graph, ids in [(prefill, c) for c in chunks] + [(decode, np.array([t])) for t in decode_tokens]:
        positions = np.arange(state.length, state.length + len(ids))
        out.append(Interpreter(graph, weights).run(state, ids=ids, positions=positions)["logits"])
    return out


def check_equivalence(cfg: ModelConfig, weights: Callable[[str], np.ndarray], passes: Sequence[str],
                      prompt_len: int = 11, decode_steps: int = 4, logits_to_keep: int | None = 1,
                      seed: int = 0) -> Equivalence:
    """Max |logits(original) - logits(optimized)| over prefill (two chunks) and decode steps."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.input_vocab_size, size=prompt_len + decode_steps)
    split = max(1, prompt_len // 2)
    chunks = [ids[:split], ids[split:prompt_len]]
    graphs = {mode: build_graph(cfg, mode, logits_to_keep if mode == "prefill" else None)
              for mode in ("prefill", "decode")}
    ctx = PassContext(cfg, weights)
    optimized = {mode: PassManager(passes).run(g, ctx) for mode, g in graphs.items()}
    before = _run_sequence(graphs["prefill"], graphs["decode"], weights, chunks, ids[prompt_len:])
    after = _run_sequence(optimized["prefill"], optimized["decode"], weights, chunks, ids[prompt_len:])
    diff = max(float(np.abs(a - b).max()) for a, b in zip(before, after, strict=True))
    return Equivalence(diff, len(before), {m: len(g) for m, g in graphs.items()},
                       {m: len(g) for m, g in optimized.items()})
