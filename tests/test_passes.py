"""Passes: each pipeline prefix is proven equivalent by the reference interpreter (prefill in two
chunks, then decode) on the checkpoint families and on fuzzed configs; the fused graphs have the
promised shape; the KV plan and the activation plan give the analytic numbers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from test_fuzz import gemma4_configs

from g4c.config import config_from_dict
from g4c.errors import ConfigError, G4CError
from g4c.frontend import build_graph
from g4c.ir import Graph, Interpreter, KVState, verify
from g4c.model import load_model
from g4c.passes import DEFAULT_PIPELINE, PassContext, PassManager, resolve_passes
from g4c.passes.equivalence import check_equivalence
from g4c.passes.memory_plan import activation_plan
from g4c.passes.plan_kv_cache import kv_plan, naive_kv_bytes
from g4c.presets import preset_config
from g4c.weights import RandomWeights, Weights

FAMILIES = ["e", "moe", "dense", "unified"]


def optimized(cfg, mode="prefill", passes=DEFAULT_PIPELINE, weights=None, keep=1) -> Graph:
    graph = build_graph(cfg, mode, keep if mode == "prefill" else None)
    return PassManager(passes).run(graph, PassContext(cfg, weights))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("upto", range(1, len(DEFAULT_PIPELINE) + 1), ids=lambda k: DEFAULT_PIPELINE[k - 1])
def test_pipeline_prefix_is_equivalent(family, upto, checkpoints):
    """Adding each pass in turn (passes build on the fusions before them) changes no logits."""
    loaded = load_model(str(checkpoints[family]))
    for keep in (1, None):
        result = check_equivalence(loaded.cfg, loaded.weights.f32, DEFAULT_PIPELINE[:upto], prompt_len=17,
                                   decode_steps=4, logits_to_keep=keep)
        assert result.max_abs_diff <= 1e-5, (DEFAULT_PIPELINE[upto - 1], keep, result)


@pytest.mark.parametrize("name", ["tiny-e", "tiny-moe", "tiny-dense", "tiny-unified"])
def test_each_pass_alone_is_equivalent(name):
    cfg = preset_config(name)
    weights = Weights(cfg, RandomWeights(cfg, seed=3))
    for p in DEFAULT_PIPELINE:
        assert check_equivalence(cfg, weights.f32, [p], prompt_len=13).max_abs_diff <= 1e-5, p


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gemma4_configs())
def test_fuzzed_configs_all_passes_equivalent(case):
    kwargs, prompt_len, seed = case
    try:
        cfg = config_from_dict({"model_type": "gemma4_text", **kwargs})
    except ConfigError:
        assume(False)
    weights = Weights(cfg, RandomWeights(cfg, seed=seed))
    result = check_equivalence(cfg, weights.f32, DEFAULT_PIPELINE, prompt_len=prompt_len + 2, decode_steps=3,
                               seed=seed)
    assert result.max_abs_diff <= 1e-5


def ops(graph: Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in graph.nodes:
        counts[n.op] = counts.get(n.op, 0) + 1
    return counts


def test_fused_e_type_graph_shape():
    cfg = preset_config("tiny-e")
    g = optimized(cfg)
    counts = ops(g)
    assert counts["fused_attention"] == cfg.num_hidden_layers
    assert counts["gated_mlp"] == counts["ple_epilogue"] == cfg.num_hidden_layers
    assert counts["ple_inputs"] == counts["lm_head"] == 1
    for gone in ("attention", "kv_cache", "rope", "linear", "softcap", "gelu_tanh", "moe_experts"):
        assert gone not in counts, gone
    table = next(p for p in g.params if p.attrs["name"] == "embed_tokens_per_layer.weight")
    assert table.attrs["memory"] == "host"
    reuse = [n for n in g.nodes if n.op == "fused_attention" and n.attrs["role"] == "reuse"]
    assert [n.attrs["kv_source"] for n in reuse] == [s.kv_source for s in cfg.layers if s.kv_mode == "reuse"]
    # KV-shared prefill pruning: the shared tail computes the single kept row
    assert all(n.type.shape == (1, cfg.hidden_size) for n in reuse)
    assert g.outputs["logits"].type.shape == (1, cfg.vocab_size)


def test_fused_moe_graph_and_decode_form():
    cfg = preset_config("tiny-moe")
    prefill, decode = optimized(cfg), optimized(cfg, "decode")
    assert ops(prefill)["moe"] == ops(decode)["moe"] == cfg.num_hidden_layers
    assert {n.attrs["decode"] for n in decode.nodes if n.op == "moe"} == {True}
    assert {n.attrs["decode"] for n in prefill.nodes if n.op == "moe"} == {False}
    attn = [n for n in prefill.nodes if n.op == "fused_attention"]
    global_ = [n for n in attn if n.attrs["kind"] == "global"]
    assert global_ and all(n.attrs["k_eq_v"] and n.attrs["k_from_v"] and n.attrs["kv_heads"] == 1 for n in global_)
    assert all(n.attrs["cache"] == "ring" and n.attrs["slots"] == cfg.sliding_window for n in attn if n.attrs["kind"] == "sliding")


def test_planned_state_is_smaller_and_exact():
    """Ring buffers hold `window` positions; k_eq_v global layers keep V only; logits unchanged."""
    cfg = preset_config("tiny-moe")
    weights = Weights(cfg, RandomWeights(cfg, seed=5))
    ids = np.arange(1, 30) % cfg.vocab_size
    states = {}
    for passes in ([], DEFAULT_PIPELINE):
        state = KVState()
        g = optimized(cfg, passes=passes, weights=weights.f32, keep=None)
        logits = Interpreter(g, weights.f32).run(state, ids=ids, positions=np.arange(len(ids)))["logits"]
        states[bool(passes)] = (state, logits)
    (plain, ref), (planned, out) = states[False], states[True]
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    assert planned.slots["layers.0.k"].shape[0] == cfg.sliding_window
    assert "layers.3.k" not in planned.slots and planned.slots["layers.3.v"].shape[0] == len(ids)
    assert planned.nbytes < plain.nbytes


def test_fold_layer_scalar_only_when_exactly_one(checkpoints):
    cfg = preset_config("tiny-dense")
    ones = lambda name: np.ones(1, np.float32) if name.endswith("layer_scalar") else RandomWeights(cfg).get(name)  # noqa: E731
    folded = optimized(cfg, passes=["fold_layer_scalar"], weights=ones)
    assert not any(p.attrs["name"].endswith("layer_scalar") for p in folded.params)
    kept = optimized(cfg, passes=["fold_layer_scalar"], weights=RandomWeights(cfg).get)
    assert sum(p.attrs["name"].endswith("layer_scalar") for p in kept.params) == cfg.num_hidden_layers
    assert len(optimized(cfg, passes=["fold_layer_scalar"], weights=None)) == len(build_graph(cfg, "prefill", 1))


def test_cse_merges_and_dce_keeps_state():
    g = Graph("t")
    x = g.input("x", ("T", 4), "float32")
    a, b = g.call("rms_norm", x, eps=1e-6), g.call("rms_norm", x, eps=1e-6)
    g.call("gelu_tanh", a)  # dead
    g.output("y", g.call("add", a, b))
    out = PassManager(["cse", "dce"]).run(g, PassContext(preset_config("tiny-dense")))
    assert ops(out) == {"input": 1, "rms_norm": 1, "add": 1}
    cfg = preset_config("tiny-dense")
    fused = optimized(cfg, passes=["fuse_attention", "dce"])
    assert ops(fused)["fused_attention"] == cfg.num_hidden_layers


def test_pass_manager_dumps_and_rejects_unknown(tmp_path):
    cfg = preset_config("tiny-e")
    manager = PassManager(DEFAULT_PIPELINE, dump_after=["input", "fuse_attention"], dump_dir=tmp_path)
    manager.run(build_graph(cfg), PassContext(cfg))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["gemma4_prefill.00.input.dot", "gemma4_prefill.00.input.txt",
                     "gemma4_prefill.02.fuse_attention.dot", "gemma4_prefill.02.fuse_attention.txt"]
    assert "fused_attention(" in (tmp_path / "gemma4_prefill.02.fuse_attention.txt").read_text()
    assert [r.name for r in manager.records] == list(DEFAULT_PIPELINE)
    with pytest.raises(G4CError, match="unknown pass 'fuse_everything'"):
        resolve_passes("fuse_attention,fuse_everything")


def test_broken_pass_is_caught_by_verification(monkeypatch):
    from g4c.passes import dce
    from g4c.passes.manager import Pass

    def corrupt(graph, ctx):
        graph.nodes.reverse()

    monkeypatch.setattr(dce, "PASS", Pass("dce", corrupt, "breaks the graph"))
    cfg = preset_config("tiny-dense")
    with pytest.raises(ValueError, match="not defined before its use"):
        PassManager(["dce"]).run(build_graph(cfg), PassContext(cfg))


def test_e2b_kv_plan_matches_analytic_minimum():
    cfg = preset_config("e2b")
    context = 131_072
    plan = kv_plan(cfg, context, dtype="bfloat16")
    analytic = 3 * 2 * 512 * context * 2 + 12 * 2 * 256 * 512 * 2
    assert sum(p.bytes for p in plan) == analytic  # ≈ 0.81 GB
    assert naive_kv_bytes(cfg, context) == (28 * 2 * 256 + 7 * 2 * 512) * context * 2  # ≈ 5.6 GB, every layer
    assert [p.storage for p in plan].count("reuse") == 20


def test_k_eq_v_single_tensor_halves_global_kv():
    cfg = preset_config("31b")
    single = sum(p.bytes for p in kv_plan(cfg, 262_144) if p.kind == "global")
    double = sum(p.bytes for p in kv_plan(cfg, 262_144, single_tensor_k_eq_v=False) if p.kind == "global")
    assert double == 2 * single


def test_activation_plan_reuses_buffers():
    cfg = preset_config("tiny-e")
    g = optimized(cfg)
    plan = activation_plan(g, tokens=32, past=0)
    assert 0 < plan.peak_bytes < plan.total_bytes
    # no two tensors alive at the same time share a buffer
    order = {n.name: i for i, n in enumerate(g.nodes)}
    last = {n.name: max([order[u.name] for u in g.users(n)] + [order[n.name]]) for n in g.nodes}
    for out in g.outputs.values():
        last[out.name] = len(g.nodes)
    by_buffer: dict[int, list[str]] = {}
    for name, buf in plan.assignment.items():
        by_buffer.setdefault(buf, []).append(name)
    for names in by_buffer.values():
        spans = sorted((order[n], last[n]) for n in names)
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))


def test_optimized_graphs_verify_for_published_presets():
    for name in ("e2b", "26b-a4b", "12b"):
        cfg = preset_config(name, num_layers=None)
        for mode in ("prefill", "decode"):
            verify(optimized(cfg, mode))


def test_ple_table_is_fetched_row_by_row(checkpoints):
    """With fuse_ple the reference session reads only the prompt's PLE rows from the mmap'd file."""
    from g4c.reference import ReferenceSession

    loaded = load_model(str(checkpoints["e"]))
    fetched: list[int] = []
    source_rows = loaded.weights.source.rows
    loaded.weights.source.rows = lambda name, ids: fetched.extend(ids.tolist()) or source_rows(name, ids)
    session = ReferenceSession(loaded.cfg, loaded.weights)
    session.generate([5, 9, 11], 3, stop_tokens=())
    assert "embed_tokens_per_layer.weight" not in loaded.weights._f32
    assert fetched[:3] == [5, 9, 11] and len(fetched) == 3 + 2
