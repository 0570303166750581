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

    prefill_chunk = 1 << 30  # the interpreter runs a whole prompt at once

    def __init__(self, cfg: ModelConfig, weights: Weights, passes: str | Sequence[str] = "all",
                 dump_after: Sequence[str] = (), dump_dir: str | None = None, media=None):
        """`passes`: "all" (the optimized graph), "none" (the frontend graph) or a list of pass names;
        `media` (a `g4c.multimodal.MediaModel`): the checkpoint's encoders, for images and audio."""
        from g4c.passes import resolve_passes

        self.cfg, self.weights, self.media_model = cfg, weights, media
        self.media = media.spec if media is not None else None
        self.hidden_size = cfg.hidden_size
        self.passes = resolve_passes(passes) if isinstance(passes, str) else list(passes)
        self.dump_after, self.dump_dir = list(dump_after), dump_dir
        self.vocab_size = cfg.input_vocab_size
        self.max_context = cfg.max_position_embeddings
        self.state = KVState()
        self._interpreters: dict[tuple[str, int | None], Interpreter] = {}

    @property
    def position(self) -> int:  # type: ignore[override]
        return self.state.length

    def _interpreter(self, mode: str, logits_to_keep: int | None, media: bool = False) -> Interpreter:
        key = (mode, logits_to_keep, media)
        if key not in self._interpreters:
            g = build_graph(self.cfg, mode, logits_to_keep, media=media)
            self._interpreters[key] = Interpreter(self._optimized(g), self.weights.f32, rows=self.weights.rows)
        return self._interpreters[key]

    def _optimized(self, g):
        from g4c.passes import PassContext, PassManager

        verify(g)
        if self.passes:
            manager = PassManager(self.passes, self.dump_after, self.dump_dir)
            g = manager.run(g, PassContext(self.cfg, self.weights.f32))
        return g

    def _run(self, mode: str, logits_to_keep: int | None, ids: np.ndarray, **media: np.ndarray) -> np.ndarray:
        positions = np.arange(self.state.length, self.state.length + ids.size, dtype=np.int64)
        interpreter = self._interpreter(mode, logits_to_keep, bool(media))
        return interpreter.run(self.state, ids=ids, positions=positions, **media)["logits"]

    def _run_media(self, program: str, arrays: dict[str, np.ndarray]) -> np.ndarray:
        keep = None if program == "prefill_all_media" else 1
        return self._run("prefill", keep, **arrays)

    def encode(self, kind: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        from g4c.multimodal import ENCODERS

        key = (ENCODERS[kind], None, False)
        if key not in self._interpreters:
            source = self.media_model.source
            graph = self._optimized(self.media_model.graphs()[ENCODERS[kind]])
            self._interpreters[key] = Interpreter(graph, lambda name: np.asarray(source.get(name), np.float32))
        return self._interpreters[key].run(**inputs)["embeddings"]

    def prefill(self, tokens: Sequence[int], all_logits: bool = False, images: Sequence = (),
                audio: Sequence = ()) -> np.ndarray:
        """The whole prompt in one run (the interpreter has no chunk limit); with media, as `Session`."""
        if images or audio or self._has_placeholders(tokens):
            return self._prefill_media(tokens, all_logits, images, audio)
        ids = self.check_tokens(tokens)
        logits = self._run("prefill", None if all_logits else 1, ids)
        return logits if all_logits else logits[-1]

    def decode(self, token: int) -> np.ndarray:
        ids = self.check_tokens([token])
        return self._run("decode", None, ids)[0]

    def reset(self) -> None:
        self.state.reset()
