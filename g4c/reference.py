"""The reference backend: runs the model graph (optimized by the pass pipeline unless `passes="none"`)
with the numpy interpreter in fp32.

Slow but exact; it is what every pass, kernel and compiled artifact is compared against."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from g4c.config import ModelConfig
from g4c.frontend import build_graph
from g4c.ir import Interpreter, KVState, verify
from g4c.runtime.session import Session
from g4c.weights import Weights


class ReferenceSession(Session):
    """`prefill`/`decode`/`generate` on the reference interpreter with a growing KV state."""

    def __init__(self, cfg: ModelConfig, weights: Weights, passes: str | Sequence[str] = "all",
                 dump_after: Sequence[str] = (), dump_dir: str | None = None):
        """`passes`: "all" (the optimized graph), "none" (the frontend graph) or a list of pass names."""
        from g4c.passes import resolve_passes

        self.cfg, self.weights = cfg, weights
        self.passes = resolve_passes(passes) if isinstance(passes, str) else list(passes)
        self.dump_after, self.dump_dir = list(dump_after), dump_dir
        self.vocab_size = cfg.input_vocab_size
        self.max_context = cfg.max_position_embeddings
        self.state = KVState()
        self._interpreters: dict[tuple[str, int | None], Interpreter] = {}

    @property
    def position(self) -> int:  # type: ignore[override]
        return self.state.length

    def _interpreter(self, mode: str, logits_to_keep: int | None) -> Interpreter:
        key = (mode, logits_to_keep)
        if key not in self._interpreters:
            from g4c.passes import PassContext, PassManager

            g = build_graph(self.cfg, mode, logits_to_keep)
            verify(g)
            if self.passes:
                manager = PassManager(self.passes, self.dump_after, self.dump_dir)
                g = manager.run(g, PassContext(self.cfg, self.weights.f32))
            self._interpreters[key] = Interpreter(g, self.weights.f32, rows=self.weights.rows)
        return self._interpreters[key]

    def _run(self, mode: str, logits_to_keep: int | None, ids: np.ndarray) -> np.ndarray:
        positions = np.arange(self.state.length, self.state.length + ids.size, dtype=np.int64)
        return self._interpreter(mode, logits_to_keep).run(self.state, ids=ids, positions=positions)["logits"]

    def prefill(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        ids = self.check_tokens(tokens)
        logits = self._run("prefill", None if all_logits else 1, ids)
        return logits if all_logits else logits[-1]

    def decode(self, token: int) -> np.ndarray:
        ids = self.check_tokens([token])
        return self._run("decode", None, ids)[0]

    def reset(self) -> None:
        self.state.reset()
