"""The IR: construction, verifier, printers, networkx views, and the interpreter's op semantics."""

from __future__ import annotations

import numpy as np
import pydot
import pytest

from g4c.frontend import build_graph
from g4c.ir import Graph, IRTypeError, Interpreter, KVState, VerificationError, format_graph, to_dot, verify
from g4c.ir.interpreter import attention
from g4c.presets import preset_config


@pytest.fixture(scope="module")
def e_graph() -> Graph:
    return build_graph(preset_config("tiny-e"))


def test_frontend_graphs_verify(e_graph):
    for name in ("tiny-e", "tiny-moe", "tiny-dense", "tiny-unified", "e2b", "26b-a4b"):
        for mode in ("prefill", "decode"):
            verify(build_graph(preset_config(name), mode))
    verify(e_graph)


def test_symbolic_and_decode_shapes(e_graph):
    k_cache = e_graph.node("l0_k_cache")
    assert k_cache.type.shape == ("P+T", 1, 16)
    assert e_graph.outputs["logits"].type.shape == ("T", 512)
    decode = build_graph(preset_config("tiny-e"), "decode")
    assert decode.outputs["logits"].type.shape == (1, 512)
    assert build_graph(preset_config("tiny-e"), logits_to_keep=1).outputs["logits"].type.shape == (1, 512)


def test_kv_sharing_is_visible_as_use_def(e_graph):
    """Shared layers read their donor's cache nodes and own no cache."""
    cfg = preset_config("tiny-e")
    uses = e_graph.use_def()
    for spec in cfg.layers:
        attn = e_graph.node(f"l{spec.index}_attn")
        k, v = attn.inputs[1], attn.inputs[2]
        assert k.name == f"l{spec.kv_source}_k_cache" and v.name == f"l{spec.kv_source}_v_cache"
    consumers = {u.name for u in uses[e_graph.node("l3_k_cache")] if u.op == "attention"}
    assert consumers == {"l3_attn", "l4_attn"}
    assert not any(n.name.startswith("l5_k") for n in e_graph.nodes)


def test_params_reference_weights_by_name(e_graph):
    names = {p.attrs["name"] for p in e_graph.params}
    assert "embed_tokens.weight" in names and "layers.2.self_attn.k_norm.weight" in names
    embed = next(p for p in e_graph.params if p.attrs["name"] == "embed_tokens.weight")
    assert {u.name for u in e_graph.users(embed)} == {"embed", "lm_head"}  # tied LM head


def test_topological_order_and_networkx(e_graph):
    assert e_graph.topological_order() == e_graph.nodes
    nxg = e_graph.to_networkx()
    assert nxg.number_of_nodes() == len(e_graph)
    assert nxg.has_edge("l0_k_cache", "l3_attn") is False and nxg.has_edge("l2_k_cache", "l5_attn")


def test_text_and_dot_forms(e_graph, tmp_path):
    text = format_graph(e_graph)
    assert text.startswith("graph gemma4_prefill(%ids: i64[T], %positions: i64[T]) {")
    assert "%l2_attn = attention(%l2_q_rope, %l2_k_cache, %l2_v_cache, %positions, scaling=1.0, window=None)" in text
    dot_src = to_dot(e_graph).to_string()
    parsed = pydot.graph_from_dot_data(dot_src)[0]
    assert len(parsed.get_edges()) >= sum(len(n.inputs) for n in e_graph.nodes)


def test_verifier_rejects_broken_graphs():
    g = Graph("bad")
    x = g.input("x", ("T", 4), "float32")
    w = g.param("w", (3, 4), "float32")
    y = g.call("linear", x, w)
    g.output("y", y)
    verify(g)
    y.type = type(y.type)(("T", 5))
    with pytest.raises(VerificationError, match="stored type"):
        verify(g)
    y.type = type(y.type)(("T", 3))
    g.nodes.reverse()  # uses before defs
    with pytest.raises(VerificationError, match="not defined before its use"):
        verify(g)
    with pytest.raises(IRTypeError, match="does not match weight"):
        g.call("linear", x, g.param("w2", (3, 5), "float32"))
    with pytest.raises(IRTypeError, match="unknown op"):
        g.call("conv3d", x)


def test_attention_sliding_window_masks_old_keys():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 4), dtype=np.float32)
    k = rng.standard_normal((10, 1, 4), dtype=np.float32)
    v = rng.standard_normal((10, 1, 4), dtype=np.float32)
    out = attention(q, k, v, np.array([9]), scaling=1.0, window=3)
    k2, v2 = k.copy(), v.copy()
    k2[:7], v2[:7] = 100.0, 100.0  # keys 0..6 are outside the window of query 9
    np.testing.assert_array_equal(attention(q, k2, v2, np.array([9]), scaling=1.0, window=3), out)
    assert not np.allclose(attention(q, k2, v2, np.array([9]), scaling=1.0, window=None), out)


def test_interpreter_state_advances_and_checks_shapes():
    from g4c.weights import RandomWeights, Weights

    cfg = preset_config("tiny-dense")
    w = Weights(cfg, RandomWeights(cfg, seed=1))
    state = KVState()
    interp = Interpreter(build_graph(cfg), w.f32)
    interp.run(state, ids=np.array([1, 2, 3]), positions=np.arange(3))
    assert state.length == 3 and state.slots["layers.0.k"].shape == (3, 2, 16)
    interp.run(state, ids=np.array([4]), positions=np.array([3]))
    assert state.length == 4 and state.slots["layers.2.v"].shape == (4, 2, 32)
