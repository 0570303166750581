"""`g4c bench`: the byte counts behind the roofline, decoding at a given context, the profiler, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import PROMPT

from g4c.bench import (bench_session, decode_at_context, decode_weight_bytes, gemv_bandwidth, kv_read_bytes,
                       read_bandwidth)
from g4c.cli import main
from g4c.config import load_config
from g4c.artifact import read_aligned_safetensors
from g4c.runtime import load


def test_decode_reads_every_packed_weight_once_with_a_tied_lm_head(artifacts):
    """The embedding gather reads one row, but the tied LM head streams the whole table, so a decode
    step reads exactly the bytes stored in weights.safetensors."""
    session = load(artifacts["e"])
    stored = sum(a.nbytes for a in read_aligned_safetensors(artifacts["e"] / "weights.safetensors").values())
    assert decode_weight_bytes(session) == stored


@pytest.mark.parametrize("context", [3, 200, 1000])
def test_kv_read_bytes_follow_the_layer_types(checkpoints, artifacts, context):
    """Sliding producers read at most their window, global producers every position, sharers nothing."""
    cfg = load_config(checkpoints["e"])
    expected = 0
    for layer in cfg.layers:
        if layer.kv_mode == "reuse":
            continue
        rows = min(context + 1, layer.window) if layer.is_sliding else context + 1
        tensors = 1 if layer.k_eq_v else 2
        expected += rows * layer.num_kv_heads * layer.head_dim * 4 * tensors
    assert kv_read_bytes(load(artifacts["e"], max_context=2048), context) == expected


def test_decode_at_context_continues_from_that_position(artifacts):
    session = load(artifacts["dense"], max_context=512)
    decode_at_context(session, 300)
    logits = session.decode(7)
    assert session.position == 301 and np.isfinite(logits).all()
    assert np.abs(session.caches[next(iter(session.caches))]).max() > 0  # random contents, not zeros


def test_bench_session_reports_consistent_numbers(artifacts):
    session = load(artifacts["moe"], max_context=256, prefill_chunk=len(PROMPT))
    r = bench_session(session, prompt_len=len(PROMPT), gen=3, context=100, threads=1, bandwidth_gb_s=10.0,
                      profile=True)
    assert r.context == 100 and r.prefill_tok_s > 0 and r.decode_tok_s > 0
    assert r.decode_bytes == r.weight_bytes + kv_read_bytes(session, 100 + 1)
    assert r.roofline_tok_s == pytest.approx(10e9 / r.decode_bytes)
    assert r.roofline_ratio == pytest.approx(r.decode_tok_s / r.roofline_tok_s)
    decode = {row["kernel"] for row in r.profile["decode"]}
    assert any(k.startswith("attention_") for k in decode) and any(k.startswith("moe_") for k in decode)
    assert sum(row["share"] for row in r.profile["prefill"]) == pytest.approx(1.0)


def test_bandwidth_kernels_measure_something():
    assert read_bandwidth(1, megabytes=64, repeats=2) > 0.1
    assert gemv_bandwidth(megabytes=64, repeats=2) > 0.1


@pytest.mark.slow  # ~28 s: compiles a preset first; CI time
def test_cli_bench_json_on_a_preset_and_an_artifact(artifacts, capsys):
    assert main(["bench", "tiny-e", "--random-weights", "--prompt-len", "5", "--gen", "2", "--threads", "1",
                 "--json"]) == 0
    preset = json.loads(capsys.readouterr().out)
    assert preset["prompt_len"] == 5 and preset["decode_tok_s"] > 0 and preset["peak_rss_mb"] > 0
    assert main(["bench", str(artifacts["unified"]), "--prompt-len", "4", "--gen", "2", "--context", "50",
                 "--profile"]) == 0
    text = capsys.readouterr().out
    assert "roofline" in text and "decode kernel" in text and "context 50" in text


@pytest.mark.parametrize("args, message", [
    (["tiny-e", "--random-weights", "--target", "mips"], "unknown target"),
    (["tiny-e", "--random-weights", "--gen", "0"], "--gen"),
    (["/nonexistent/model"], "no checkpoint directory or preset"),
])
def test_cli_bench_refuses_bad_input(args, message, capsys):
    assert main(["bench", *args]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_moe_decode_reads_only_the_selected_experts(artifacts, checkpoints):
    cfg = load_config(checkpoints["moe"])
    session = load(artifacts["moe"])
    stored = read_aligned_safetensors(artifacts["moe"] / "weights.safetensors")
    experts = sum(a.nbytes for n, a in stored.items() if ".experts." in n)
    assert experts > 0
    dense = sum(a.nbytes for n, a in stored.items() if ".experts." not in n)
    assert decode_weight_bytes(session) == dense + experts * cfg.top_k_experts // cfg.num_experts
