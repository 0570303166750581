"""Token sampling from logits: greedy, temperature, top-k, top-p, seeded. numpy only, so the
compiler-free runtime and the reference backend share it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from g4c.errors import G4CError


@dataclass
class Sampler:
    """`temperature == 0` is greedy (argmax); otherwise softmax(logits / temperature) restricted to
    the `top_k` most likely tokens (0 = all) and the smallest nucleus with mass ≥ `top_p`."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise G4CError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise G4CError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise G4CError(f"--top-p must be in (0, 1], got {self.top_p}")
        self._rng = np.random.default_rng(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float64).reshape(-1)
        if self.greedy:
            return int(np.argmax(logits))
        probs = self.probabilities(logits)
        return int(self._rng.choice(probs.size, p=probs))

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution actually sampled from (after temperature, top-k and top-p)."""
        scaled = np.asarray(logits, dtype=np.float64).reshape(-1) / self.temperature
        order = np.argsort(-scaled, kind="stable")
        keep = order[: self.top_k] if self.top_k else order
        probs = np.exp(scaled[keep] - scaled[keep[0]])
        probs /= probs.sum()
        if self.top_p < 1.0:  # smallest prefix whose mass reaches top_p (always ≥ 1 token)
            cutoff = int(np.searchsorted(np.cumsum(probs), self.top_p) + 1)
            keep, probs = keep[:cutoff], probs[:cutoff] / probs[:cutoff].sum()
        out = np.zeros_like(scaled)
        out[keep] = probs
        return out
