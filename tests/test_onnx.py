"""`g4c export-onnx`: the text decoder as a standard ONNX decoder run by onnxruntime (CPU), against
transformers and the reference interpreter; `g4c graph --format onnx`: the fused IR as an ONNX view."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort  # a test dependency (pyproject.toml)
import pytest
from conftest import PROMPT
from hf_reference import reference_greedy, reference_logits

from g4c.cli import main

FAMILIES = ["e", "moe", "dense", "unified"]


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx")
    for family in FAMILIES:
        assert main(["export-onnx", str(checkpoints[family]), "-o", str(root / family)]) == 0
    return {family: root / family / "model.onnx" for family in FAMILIES}


class Decoder:
    """An exported model in onnxruntime, fed as a generation loop feeds it (present → past)."""

    def __init__(self, path: Path):
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.pasts = {i.name: i.shape for i in self.session.get_inputs() if i.name.startswith("past_key_values.")}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, ids: list[list[int]], start: int, past: dict | None = None) -> dict[str, np.ndarray]:
        batch, tokens = len(ids), len(ids[0])
        feed = {"input_ids": np.array(ids, np.int64),
                "position_ids": np.tile(np.arange(start, start + tokens, dtype=np.int64), (batch, 1))}
        for name, shape in self.pasts.items():
            feed[name] = past[name] if past else np.zeros((batch, shape[1], 0, shape[3]), np.float32)
        return dict(zip(self.outputs, self.session.run(None, feed)))

    def prefill_then_decode(self, prompt: list[int], split: int) -> np.ndarray:
        """Logits of every position: `prompt[:split]` in one run, then one token per run through the caches."""
        result = self.run([prompt[:split]], 0)
        rows = [result["logits"][0]]
        for position in range(split, len(prompt)):
            past = {k.replace("present.", "past_key_values."): v for k, v in result.items() if k.startswith("present.")}
            result = self.run([[prompt[position]]], position, past)
            rows.append(result["logits"][0])
        return np.concatenate(rows)


def greedy(decoder: Decoder, prompt: list[int], steps: int) -> list[int]:
    result, new = decoder.run([prompt], 0), []
    for position in range(len(prompt), len(prompt) + steps):
        new.append(int(result["logits"][0, -1].argmax()))
        past = {k.replace("present.", "past_key_values."): v for k, v in result.items() if k.startswith("present.")}
        result = decoder.run([[new[-1]]], position, past)
    return new


@pytest.mark.parametrize("family", FAMILIES)
def test_onnxruntime_matches_transformers(family, exports, references):
    """A prompt longer than the sliding window in one run, then the same prompt as a prefill of 12
    tokens and 8 decode steps through past_key_values → present; 32 greedy tokens."""
    onnx.checker.check_model(str(exports[family]), full_check=True)
    decoder = Decoder(exports[family])
    want = reference_logits(references[family], PROMPT)
    assert np.abs(decoder.run([PROMPT], 0)["logits"][0] - want).max() <= 1e-4
    assert np.abs(decoder.prefill_then_decode(PROMPT, 12) - want).max() <= 1e-4
    assert greedy(decoder, PROMPT[:6], 32) == reference_greedy(references[family], PROMPT[:6], 32)


def test_the_interface_is_the_standard_decoders(exports, checkpoints):
    """Names and shapes as onnxruntime-genai / optimum exports; caches only for layers that own one, the
    KV-sharing layers' donors in the metadata."""
    model = onnx.load(str(exports["e"]), load_external_data=False)
    config = json.loads((checkpoints["e"] / "config.json").read_text())
    text = config.get("text_config", config)
    shared = text["num_kv_shared_layers"]
    owners = list(range(text["num_hidden_layers"] - shared))
    inputs = [i.name for i in model.graph.input]
    assert inputs == ["input_ids", "position_ids"] + [f"past_key_values.{i}.{p}" for i in owners
                                                      for p in ("key", "value")]
    outputs = [o.name for o in model.graph.output]
    assert outputs == ["logits"] + [f"present.{i}.{p}" for i in owners for p in ("key", "value")]
    meta = {p.key: p.value for p in model.metadata_props}
    sources = json.loads(meta["g4c.kv_sources"])
    assert sorted(map(int, sources)) == list(range(len(owners), text["num_hidden_layers"]))
    assert all(source in owners for source in sources.values())
    dims = lambda v: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(model.graph.input[0]) == ["batch_size", "sequence_length"]
    assert dims(model.graph.input[2])[0::2] == ["batch_size", "past_sequence_length"]
    assert dims(model.graph.output[0]) == ["batch_size", "sequence_length", text["vocab_size"]]


def test_a_batch_is_each_prompt_on_its_own(exports):
    decoder = Decoder(exports["moe"])
    prompts = [PROMPT[:9], PROMPT[5:14]]
    both = decoder.run(prompts, 0)["logits"]
    for row, prompt in zip(both, prompts):
        assert np.abs(row - decoder.run([prompt], 0)["logits"][0]).max() <= 1e-5


def test_opset_18_primitives_match_the_attention_op(checkpoints, exports, references, tmp_path):
    """Below opset 23 attention is MatMul/Softmax with repeated KV heads, GELU its tanh formula."""
    assert main(["export-onnx", str(checkpoints["unified"]), "-o", str(tmp_path / "o18"), "--opset", "18"]) == 0
    model = onnx.load(str(tmp_path / "o18" / "model.onnx"), load_external_data=False)
    assert {o.version for o in model.opset_import} == {18}
    assert not {n.op_type for n in model.graph.node} & {"Attention", "Gelu"}
    decoder = Decoder(tmp_path / "o18" / "model.onnx")
    want = reference_logits(references["unified"], PROMPT)
    assert np.abs(decoder.prefill_then_decode(PROMPT, 7) - want).max() <= 1e-4


def test_fp16_storage_is_exact_on_the_rounded_weights(checkpoints, tmp_path):
    """--dtype fp16 stores the matrices as float16: exact (fp32 tolerance) against the reference
    interpreter on the same weights rounded to float16, and the data file is about half the size."""
    from g4c.model import load_model
    from g4c.onnx_export import _half_params, standard_graph
    from g4c.reference import ReferenceSession

    assert main(["export-onnx", str(checkpoints["moe"]), "-o", str(tmp_path / "h"), "--dtype", "fp16"]) == 0
    assert main(["export-onnx", str(checkpoints["moe"]), "-o", str(tmp_path / "f")]) == 0
    loaded = load_model(str(checkpoints["moe"]))
    half = _half_params(standard_graph(loaded.cfg))
    assert "layers.0.experts.gate_up_proj" in half and "layers.0.input_layernorm.weight" not in half
    f32 = loaded.weights.f32
    loaded.weights.f32 = lambda name: f32(name).astype(np.float16).astype(np.float32) if name in half else f32(name)
    want = ReferenceSession(loaded.cfg, loaded.weights, "none").prefill(PROMPT, all_logits=True)
    got = Decoder(tmp_path / "h" / "model.onnx").run([PROMPT], 0)["logits"][0]
    assert np.abs(got - want).max() <= 1e-4
    ratio = (tmp_path / "h" / "model.onnx.data").stat().st_size / (tmp_path / "f" / "model.onnx.data").stat().st_size
    assert 0.45 < ratio < 0.65


def test_the_netron_view_has_one_node_per_fused_op(checkpoints, tmp_path):
    from g4c.frontend import build_graph
    from g4c.model import model_config
    from g4c.passes import PassContext, PassManager, resolve_passes

    out = tmp_path / "view.onnx"
    assert main(["graph", str(checkpoints["e"]), "--passes", "all", "--format", "onnx", "-o", str(out)]) == 0
    cfg = model_config(str(checkpoints["e"]))
    graph = PassManager(resolve_passes("all")).run(build_graph(cfg, "prefill", logits_to_keep=1), PassContext(cfg))
    model = onnx.load(str(out))
    ops = [n for n in graph if n.op not in ("input", "param")]
    assert [(n.op_type, n.domain) for n in model.graph.node] == [(n.op, "g4c") for n in ops]
    attention = next(n for n in model.graph.node if n.op_type == "fused_attention")
    assert {a.name for a in attention.attribute} >= {"window", "q_heads", "kv_heads", "role"}
    assert sum(n.op_type == "fused_attention" for n in model.graph.node) == cfg.num_hidden_layers


def test_bad_export_requests_are_one_line(artifacts, tmp_path, capsys):
    assert main(["export-onnx", "tiny-e", "--random-weights", "--opset", "7", "-o", str(tmp_path / "a")]) == 1
    assert main(["export-onnx", "tiny-e", "--random-weights", "--dtype", "int3", "-o", str(tmp_path / "b")]) == 1
    assert main(["export-onnx", str(artifacts["e"]), "-o", str(tmp_path / "c")]) == 1
    assert main(["export-onnx", "tiny-e", "-o", str(tmp_path / "d")]) == 1  # a preset without --random-weights
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4
    assert "--opset 7 is not supported" in err[0] and "--dtype must be one of" in err[1]
    assert "is a compiled artifact" in err[2] and "--random-weights" in err[3]
    assert not any((tmp_path / name).exists() for name in "abcd")
