"""The generation loop every backend shares: prefill once, then decode token by token.

A backend implements `prefill(tokens, all_logits)` and `decode(token)`; `generate` adds sampling,
stop tokens, a streaming callback and the context-length check."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from g4c.errors import G4CError
from g4c.runtime.sampling import Sampler


class Session:
    """Stateful inference over one sequence (its KV cache lives in the backend)."""

    vocab_size: int
    max_context: int
    position: int = 0  # tokens already in the KV cache
    prefill_chunk: int = 64  # compiled backends run a long prompt as chunks of this many tokens

    def prefill(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Feed tokens after the cached ones; logits of the last token [vocab] (or [T, vocab])."""
        ids = self.check_tokens(tokens)
        outputs = [self._run("prefill_all" if all_logits else "prefill", ids[start: start + self.prefill_chunk])
                   for start in range(0, ids.size, self.prefill_chunk)]
        return np.concatenate(outputs) if all_logits else outputs[-1][-1]

    def decode(self, token: int) -> np.ndarray:
        """Feed one token; its logits [vocab]."""
        return self._run("decode", self.check_tokens([token]))[0]

    def _run(self, program: str, ids: np.ndarray) -> np.ndarray:
        """Compiled backends: run `program` (prefill, prefill_all, decode) on these ids, advance the
        position and return the logits it produces."""
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def check_tokens(self, tokens: Sequence[int]) -> np.ndarray:
        ids = np.asarray(list(tokens), dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise G4CError("need at least one token id")
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise G4CError(f"token id {int(bad[0])} is outside the vocabulary (0..{self.vocab_size - 1})")
        if self.position + ids.size > self.max_context:
            raise G4CError(f"context of {self.position + ids.size} tokens exceeds the model's maximum "
                           f"({self.max_context})")
        return ids

    def generate(self, tokens: Sequence[int], max_new_tokens: int, sampler: Sampler | None = None,
                 stop_tokens: Sequence[int] = (), on_token: Callable[[int], None] | None = None) -> list[int]:
        """Continue `tokens`; returns the new ids (ending with a stop token if one was sampled)."""
        if max_new_tokens < 0:
            raise G4CError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
        sampler = sampler or Sampler()
        stops = set(stop_tokens)
        new: list[int] = []
        if max_new_tokens == 0:
            return new
        logits = self.prefill(tokens)
        while True:
            token = sampler(logits)
            new.append(token)
            if on_token is not None:
                on_token(token)
            if token in stops or len(new) == max_new_tokens:
                return new
            logits = self.decode(token)
