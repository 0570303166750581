"""The `g4c` command line: each command on real checkpoints, one-line errors with exit status 1 (usage
errors: exit status 2), progress without a terminal, and the compile and generate summaries."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import PROMPT
from hf_reference import reference_greedy, reference_logits

from g4c.cli import main


def g4c(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "g4c.cli", *args], capture_output=True, text=True, timeout=300)


def test_logits_matches_transformers(checkpoints, references, tmp_path):
    out = tmp_path / "out.npy"
    assert main(["logits", str(checkpoints["moe"]), "--tokens", ",".join(map(str, PROMPT)), "-o", str(out),
                 "--backend", "reference"]) == 0
    logits = np.load(out)
    assert logits.dtype == np.float32 and logits.shape == (len(PROMPT), 280)
    assert np.abs(logits - reference_logits(references["moe"], PROMPT)).max() <= 1e-4


def test_generate_prints_new_ids_last(checkpoints, references):
    result = g4c("generate", str(checkpoints["e"]), "--tokens", "2,17,99,5,8,1,44", "--max-new-tokens", "10",
                 "--stop", "none")
    assert result.returncode == 0, result.stderr
    new = [int(t) for t in result.stdout.strip().splitlines()[-1].split(",")]
    assert new == reference_greedy(references["e"], [2, 17, 99, 5, 8, 1, 44], 10)


def test_sampling_is_seeded(capsys):
    args = ["generate", "tiny-dense", "--random-weights", "--tokens", "3,4,5", "--max-new-tokens", "6",
            "--temperature", "1.5", "--top-k", "50", "--top-p", "0.9", "--stop", "none"]
    runs = []
    for seed in ("7", "7", "8"):
        assert main([*args, "--seed", seed]) == 0
        runs.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert runs[0] == runs[1] != runs[2]


def test_generate_with_prompt_uses_tokenizer(checkpoints, tmp_path, capsys):
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    model_dir = tmp_path / "m"
    shutil.copytree(checkpoints["dense"], model_dir)
    vocab = {f"w{i}": i for i in range(260)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(model_dir / "tokenizer.json"))
    assert main(["generate", str(model_dir), "--prompt", "w5 w9 w11", "--max-new-tokens", "4", "--stop", "none"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    ids = [int(t) for t in lines[-1].split(",")]
    assert lines[-2].split() == [f"w{i}" for i in ids]


def test_inspect_and_graph(tmp_path, capsys):
    assert main(["inspect", "e2b"]) == 0
    text = capsys.readouterr().out
    assert "28 sliding (window 512), 7 global; 20 reuse another layer's KV" in text
    assert "reuse ← 13" in text and "store → " in text
    dot = tmp_path / "g.dot"
    assert main(["graph", "tiny-moe", "-o", str(dot)]) == 0
    assert "digraph" in dot.read_text().splitlines()[0] and "moe_experts" in dot.read_text()
    txt = tmp_path / "g.txt"
    assert main(["graph", "tiny-e", "--mode", "decode", "--format", "text", "-o", str(txt)]) == 0
    assert "graph gemma4_decode(%ids: i64[1], %positions: i64[1])" in txt.read_text()


@pytest.mark.skipif(__import__("shutil").which("dot") is None, reason="graphviz `dot` not installed")
def test_graph_svg_with_graphviz(tmp_path):
    svg = tmp_path / "g.svg"
    assert main(["graph", "tiny-dense", "--format", "svg", "--no-params", "-o", str(svg)]) == 0
    assert "<svg" in svg.read_text() and "l4_attn" in svg.read_text()


def test_init_random_then_logits(tmp_path):
    ckpt = tmp_path / "ckpt"
    result = g4c("init-random", "tiny-e", "-o", str(ckpt), "--seed", "3", "--dtype", "bf16")
    assert result.returncode == 0, result.stderr
    assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()
    from_dir = tmp_path / "a.npy"
    assert main(["logits", str(ckpt), "--tokens", "1,2,3", "-o", str(from_dir)]) == 0
    # the preset with the same seed/dtype regenerates identical weights without a checkpoint
    from g4c.model import load_model
    from g4c.reference import ReferenceSession

    loaded = load_model("tiny-e", random_weights=True, seed=3, dtype="bfloat16")
    np.testing.assert_array_equal(ReferenceSession(loaded.cfg, loaded.weights).prefill([1, 2, 3], True),
                                  np.load(from_dir))
    again = g4c("init-random", "tiny-e", "-o", str(ckpt))
    assert again.returncode == 1 and "already exists" in again.stderr


@pytest.mark.parametrize("args, message", [
    (["logits", "/no/such/dir", "--tokens", "1", "-o", "x.npy"], "no checkpoint directory or preset named"),
    (["logits", "gemma-7b", "--tokens", "1", "-o", "x.npy"], "no checkpoint directory or preset named 'gemma-7b'"),
    (["logits", "tiny-e", "--tokens", "1", "-o", "x.npy"], "add --random-weights"),
    (["logits", "tiny-e", "--random-weights", "--tokens", "1,99999", "-o", "x.npy"], "token id 99999 is outside"),
    (["logits", "tiny-e", "--random-weights", "--tokens", "1,x", "-o", "x.npy"], "--tokens must be comma-separated"),
    (["logits", "tiny-e", "--random-weights", "--tokens", "1", "-o", "x.npy", "--backend", "cuda"], "unknown backend"),
    (["generate", "tiny-e", "--random-weights", "--tokens", "1", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["generate", "tiny-e", "--random-weights", "--prompt", "hi"], "needs a tokenizer.json"),
    (["init-random", "tiny-e", "-o", "x", "--dtype", "int8"], "unsupported dtype"),
    (["inspect", "e2b", "--layers", "99"], "--layers must be in 1..35"),
])
def test_user_errors_are_one_line_with_exit_1(args, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "g4c.cli", *args], capture_output=True, text=True, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [
    [],  # prints the help
    ["frobnicate"],  # unknown command
    ["compile", "tiny-e", "--random-weights"],  # missing -o
    ["inspect", "e2b", "--layer", "4"],  # misspelled option
    ["generate", "tiny-e", "--random-weights", "--tokens"],  # option without its value
    ["bench", "tiny-e", "--random-weights", "--gen", "abc"],  # malformed value
])
def test_usage_errors_are_short_with_exit_2(args, tmp_path):
    result = subprocess.run([sys.executable, "-m", "g4c.cli", *args], capture_output=True, text=True, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.splitlines()) <= 3
    if args:
        assert result.stderr.startswith("g4c") and "error: " in result.stderr
        if args[0] != "frobnicate":
            assert f"g4c {args[0]} --help" in result.stderr
    else:
        assert result.stderr == "" and "Usage: g4c" in result.stdout and "compile" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["inspect", "e2b", "--layers", "0"], "--layers must be in 1..35, got 0"),
    (["plan", "e2b", "--context", "64", "--layers", "-1"], "--layers must be in 1..35, got -1"),
    (["logits", "tiny-e", "--random-weights", "--layers", "0", "--tokens", "1", "-o", "x.npy"],
     "--layers must be in 1..6, got 0"),
    (["compile", "tiny-e", "--random-weights", "--layers", "0", "-o", "out"], "--layers must be in 1..6, got 0"),
    (["bench", "tiny-e", "--random-weights", "--layers", "0"], "--layers must be in 1..6, got 0"),
])
def test_layers_zero_and_negative_are_refused(args, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "g4c.cli", *args], capture_output=True, text=True, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 1 and message in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.npy").exists()


def test_layers_are_checked_where_every_command_resolves_model(checkpoints):
    from g4c.errors import G4CError
    from g4c.model import load_model, model_config

    assert model_config("e2b", 4).num_hidden_layers == 4 and model_config("e2b").num_hidden_layers == 35
    for layers in (0, -2, 36):
        with pytest.raises(G4CError, match=f"--layers must be in 1..35, got {layers}"):
            model_config("e2b", layers)
        with pytest.raises(G4CError, match="--layers must be in 1..35"):
            load_model("e2b", random_weights=True, num_layers=layers)
    with pytest.raises(G4CError, match="--layers must be in 1..4, got 0"):
        load_model(str(checkpoints["dense"]), random_weights=True, num_layers=0)


def test_a_directory_that_is_no_checkpoint_nor_artifact(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in (["logits", str(empty), "--tokens", "1", "-o", str(tmp_path / "x.npy")],
                 ["generate", str(empty), "--tokens", "1"], ["inspect", str(empty)]):
        result = g4c(*args)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert (f"{empty} is neither a checkpoint (no config.json) nor a g4c artifact (no manifest.json)"
                in result.stderr)
    (empty / "manifest.json").write_text("{}")  # an artifact where a checkpoint is needed
    result = g4c("inspect", str(empty))
    assert result.returncode == 1 and "is a compiled g4c artifact: this command needs a checkpoint" in result.stderr


def test_plain_progress_lines_without_a_terminal(capsys, monkeypatch):
    from g4c import cli

    clock = [0.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: clock[0])
    report = cli._PlainProgress()
    for i in range(100):  # a fast stage: only its ends
        report("fast", i + 1, 100)
    for i in range(100):  # 0.5 s a step: a line per 10% (5 s apart)
        clock[0] += 0.5
        report("slow", i + 1, 100)
    report("slow", 100, 100)  # finished stages print nothing more
    lines = capsys.readouterr().err.splitlines()
    assert lines[:2] == ["fast: 1/100", "fast: 100/100 (0.0 s)"]
    assert lines[2:] == ["slow: 1/100"] + [f"slow: {n}/100" for n in range(11, 100, 10)] + ["slow: 100/100 (49.5 s)"]


def test_compile_summary_self_check_and_generate_speed(tmp_path):
    """Without a terminal, compile prints progress lines on stderr; it ends with the time, the size and
    a self-check against the reference interpreter; generate prints its speed before the tokens."""
    import re

    art = tmp_path / "t.g4c"
    result = g4c("compile", "tiny-e", "--random-weights", "-o", str(art), "--no-embed")  # (embed: tests/test_embed.py)
    assert result.returncode == 0, result.stderr
    progress = result.stderr.splitlines()
    assert "scheduling kernels: 1/" in progress[0]
    assert any(re.fullmatch(r"scheduling kernels: (\d+)/\1 \(\d+\.\d s\)", line) for line in progress)
    assert any(line.startswith("building library: ") for line in progress)
    summary = result.stdout
    assert re.search(rf"wrote {re.escape(str(art))} \(target llvm, 6 layers\): [\d.]+ (KiB|MiB) on disk, "
                     r"compiled in [\d.]+ s", summary), summary
    delta = re.search(r"self-check on tokens 2,17,99: max \|Δlogits\| vs the reference interpreter: (\S+)", summary)
    assert delta and float(delta.group(1)) <= 1e-4, summary
    assert re.search(r"speed: prefill 3 tokens: [\d.]+ tok/s · decode: [\d.]+ tok/s", summary), summary

    run = g4c("generate", str(art), "--tokens", "2,17,99", "--max-new-tokens", "5", "--stop", "none")
    assert run.returncode == 0, run.stderr
    assert re.fullmatch(r"prefill 3 tokens: [\d.]+ tok/s · decode: [\d.]+ tok/s\n", run.stderr), run.stderr
    from g4c.model import load_model
    from g4c.reference import ReferenceSession

    loaded = load_model("tiny-e", random_weights=True)
    expected = ReferenceSession(loaded.cfg, loaded.weights).generate([2, 17, 99], 5)
    assert run.stdout.strip().splitlines()[-1] == ",".join(map(str, expected))

    quiet = g4c("compile", "tiny-e", "--random-weights", "--layers", "2", "-o", str(tmp_path / "q"), "--no-check",
                "--no-embed")
    assert quiet.returncode == 0, quiet.stderr
    assert "wrote" in quiet.stdout and "self-check" not in quiet.stdout and "tok/s" not in quiet.stdout
    bad = g4c("compile", "tiny-e", "--random-weights", "-o", str(tmp_path / "b"), "--check-tokens", "1,99999")
    assert bad.returncode == 1 and "--check-tokens: token id 99999 is outside" in bad.stderr
    assert not (tmp_path / "b").exists()


def test_bad_config_in_checkpoint_is_one_line(checkpoints, tmp_path):
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["dense"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_key_value_heads"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    result = g4c("logits", str(bad), "--tokens", "1", "-o", str(tmp_path / "x.npy"))
    assert result.returncode == 1 and "num_key_value_heads" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "x.npy").exists()


def test_help_shows_examples():
    result = g4c("generate", "--help")
    assert result.returncode == 0 and "Example: g4c generate" in result.stdout


def test_plan_json_reports_analytic_kv_bytes():
    result = g4c("plan", "e2b", "--context", "131072", "--json")
    assert result.returncode == 0, result.stderr
    import json

    plan = json.loads(result.stdout)
    assert plan["kv_bytes"] == 3 * 2 * 512 * 131072 * 2 + 12 * 2 * 256 * 512 * 2
    assert round(plan["naive_kv_bytes"] / 1e9, 1) == 5.6
    assert plan["activation_bytes"] > 0 and len(plan["layers"]) == 35
    assert plan["layers"][20] == {**plan["layers"][20], "storage": "reuse", "source": 13, "bytes": 0}
    table = g4c("plan", "26b-a4b", "--context", "4096", "--dtype", "fp16")
    assert table.returncode == 0 and "naive" in table.stdout and "k_eq_v saves" in table.stdout


def test_passes_flag_and_dumps(checkpoints, references, tmp_path):
    prompt = ",".join(map(str, PROMPT))
    for passes in ("all", "none", "fuse_attention,fuse_mlp,dce"):
        out = tmp_path / f"{passes}.npy"
        assert main(["logits", str(checkpoints["e"]), "--tokens", prompt, "-o", str(out), "--passes", passes,
                     "--dump-after", "input", "--dump-dir", str(tmp_path / "dumps")]) == 0
        assert np.abs(np.load(out) - reference_logits(references["e"], PROMPT)).max() <= 1e-4
    assert (tmp_path / "dumps" / "gemma4_prefill.00.input.txt").is_file()
    bad = g4c("logits", str(checkpoints["e"]), "--tokens", "1", "-o", str(tmp_path / "x.npy"), "--passes", "fuse_all")
    assert bad.returncode == 1 and "unknown pass 'fuse_all'" in bad.stderr and bad.stderr.count("\n") == 1


def test_graph_after_passes(tmp_path):
    txt = tmp_path / "fused.txt"
    assert main(["graph", "tiny-moe", "--passes", "all", "--format", "text", "-o", str(txt)]) == 0
    text = txt.read_text()
    assert "fused_attention(" in text and "moe(" in text and "lm_head(" in text and "kv_cache(" not in text


def test_a_killed_writer_leaves_nothing_behind_the_next_run_removes(tmp_path):
    """A compile killed outright (SIGKILL, out of memory) cannot clean its temporary directory; the
    next write of the same target removes it (its PID is gone), and leaves a running writer's alone."""
    from g4c.atomic import atomic_directory

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = tmp_path / f".out.{dead.stdout.strip()}.x1"
    running = tmp_path / f".out.{os.getpid()}.x2"
    other = tmp_path / ".other.1.x3"
    for d in (abandoned, running, other):
        d.mkdir()
        (d / "weights.safetensors").write_bytes(b"partial")
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert not abandoned.exists() and running.exists() and other.exists()
    assert (tmp_path / "out" / "manifest.json").is_file()
