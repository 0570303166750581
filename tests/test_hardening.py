"""Bad inputs found by a probe, each refused in one line on stderr with a non-zero exit status and no
traceback, touching nothing outside its target: non-finite weights, a FIFO or unreadable weights file,
an enormous token id, a truncated GGUF vocabulary, an output file in a missing directory, absurd model
sizes; and the atomic writer: --overwrite never leaves the target path empty, the dead-writer clean-up
matches only its own target's temporaries, written artifacts follow the umask."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from g4c import atomic
from g4c.atomic import atomic_directory, atomic_file, remove_abandoned
from g4c.checkpoint import write_random_checkpoint
from g4c.cli import main
from g4c.errors import G4CError
from g4c.presets import preset_config


def run(capsys, *args: str) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def one_line_error(code: int, err: str, *fragments: str) -> str:
    """The error line, after checking: exit status 1, the last stderr line is the only error line (plain
    progress lines may come before it), no traceback."""
    lines = err.strip().splitlines()
    assert code == 1, err
    assert lines and lines[-1].startswith("g4c: error: "), err
    assert sum("error" in line.lower() for line in lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


@pytest.fixture
def small_checkpoint(tmp_path) -> Path:
    """tiny-e cut to 2 layers (PLE table, KV sharing), float32."""
    return write_random_checkpoint(preset_config("tiny-e", 2), tmp_path / "ckpt", seed=3)


def corrupt(checkpoint: Path, name: str, value: float) -> None:
    tensors = load_file(checkpoint / "model.safetensors")
    array = tensors[f"model.{name}"].copy()
    array.reshape(-1)[1] = value
    tensors[f"model.{name}"] = array
    save_file(tensors, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})


# ---- 1. non-finite weights ---------------------------------------------------------------------
@pytest.mark.parametrize("name, value, dtype, message", [
    ("layers.0.mlp.up_proj.weight", np.nan, "fp32", "tensor layers.0.mlp.up_proj.weight has NaN values"),
    ("embed_tokens_per_layer.weight", np.inf, "fp32", "tensor embed_tokens_per_layer.weight has infinite values"),
    ("layers.1.self_attn.q_proj.weight", 1e6, "fp16", "tensor layers.1.self_attn.q_proj.weight overflows float16"),
])
def test_non_finite_weights_are_refused_at_compile(small_checkpoint, tmp_path, capsys, name, value, dtype, message):
    corrupt(small_checkpoint, name, value)
    out = tmp_path / "out"
    code, err = run(capsys, "compile", small_checkpoint, "-o", out, "--dtype", dtype, "--no-check")
    one_line_error(code, err, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no artifact, no temporary directory


def test_finite_check_allocates_nothing_and_reads_every_dtype():
    import ml_dtypes

    from g4c.compiler import check_finite

    for dtype in (np.float32, np.float16, ml_dtypes.bfloat16):
        good = np.linspace(-2, 2, 64, dtype=np.float32).astype(dtype)
        assert check_finite("w", good) is good
        for bad, kind in ((np.nan, "NaN"), (-np.inf, "infinite")):
            array = good.copy()
            array[7] = bad
            with pytest.raises(G4CError, match=f"tensor w has {kind} values"):
                check_finite("w", array)


# ---- 2. a FIFO or an unreadable weights file ---------------------------------------------------
def test_fifo_weights_file_is_refused_not_read(small_checkpoint, tmp_path):
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    shutil.copy(small_checkpoint / "config.json", fifo)
    os.mkfifo(fifo / "model.safetensors")
    try:  # before the fix, safetensors blocks opening the FIFO: the timeout fails the test
        result = subprocess.run([sys.executable, "-m", "g4c.cli", "logits", str(fifo), "--tokens", "1", "-o",
                                 str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("g4c blocked reading a FIFO")
    one_line_error(result.returncode, result.stderr, "not a regular file (a FIFO)")
    assert not (tmp_path / "x.npy").exists()


def test_shard_that_is_not_a_file_is_named_as_such(small_checkpoint, tmp_path):
    import json

    from g4c.weights import Checkpoint

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(small_checkpoint / "config.json", sharded)
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "shard.safetensors"}}))
    (sharded / "shard.safetensors").mkdir()
    with pytest.raises(G4CError, match="shard.safetensors: not a regular file \\(a directory\\)"):
        Checkpoint(sharded)


def test_unreadable_weights_file_says_permission_denied(small_checkpoint):
    """As root, chmod cannot deny a read: the command then runs as `nobody` (setpriv)."""
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot deny a read")
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    root = Path(tempfile.mkdtemp(prefix="g4c-perm-"))  # pytest's tmp_path is private to its user
    try:
        root.chmod(0o777)
        checkpoint = root / "ckpt"
        shutil.copytree(small_checkpoint, checkpoint)
        checkpoint.chmod(0o755)
        (checkpoint / "config.json").chmod(0o644)
        (checkpoint / "model.safetensors").chmod(0o000)
        result = subprocess.run([*prefix, sys.executable, "-m", "g4c.cli", "logits", str(checkpoint), "--tokens",
                                 "1", "-o", str(root / "x.npy")], capture_output=True, text=True, timeout=300,
                                cwd=root)
        line = one_line_error(result.returncode, result.stderr, "model.safetensors: permission denied")
        assert "No such file" not in line and not (root / "x.npy").exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---- 3. an enormous token id -------------------------------------------------------------------
@pytest.mark.parametrize("command", [["generate", "--max-new-tokens", "2"], ["logits", "-o", "{tmp}/x.npy"]])
def test_enormous_token_id_is_one_line(tmp_path, capsys, command):
    args = [a.format(tmp=tmp_path) for a in command]
    code, err = run(capsys, args[0], "tiny-dense", "--random-weights", *args[1:],
                    "--tokens", "2,99999999999999999999999")
    one_line_error(code, err, "token id 99999999999999999999999 is out of range")
    assert list(tmp_path.iterdir()) == []


# ---- 4. a truncated GGUF vocabulary ------------------------------------------------------------
def write_gguf(path: Path, tokens: int = 20000, tensor: bool = False) -> Path:
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "gemma4")
    writer.add_tokenizer_model("gemma4")
    names = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    names += ["a", "b", "ab"] + [f"piece{i}" for i in range(tokens - len(names) - 3)]
    writer.add_token_list(names)
    writer.add_token_types([gguf.TokenType.CONTROL] * 4 + [gguf.TokenType.BYTE] * 256
                           + [gguf.TokenType.NORMAL] * (tokens - 260))
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(2)
    writer.add_unk_token_id(3)
    if tensor:
        writer.add_tensor("table", np.ones((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    if tensor:
        writer.write_tensors_to_file()
    writer.close()
    return path


def truncate(path: Path, keep: int) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return path


def test_truncated_gguf_is_refused_before_gguf_reads_it(tmp_path, capsys, monkeypatch):
    gguf = pytest.importorskip("gguf")

    def reader(*args, **kwargs):  # the check must refuse first: gguf's reader takes ~1 GB and 30 s
        raise AssertionError("GGUFReader called on a truncated file")

    full = write_gguf(tmp_path / "v.gguf")
    assert main(["tokenizer", str(full), "-o", str(tmp_path / "ok.json")]) == 0  # the complete file converts
    capsys.readouterr()
    monkeypatch.setattr(gguf, "GGUFReader", reader)
    for keep in (full.stat().st_size // 2, full.stat().st_size - 1, 30):
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(full.read_bytes()[:keep])
        code, err = run(capsys, "tokenizer", cut, "-o", tmp_path / "t.json")
        one_line_error(code, err, "not a readable GGUF file (truncated")
    with_tensor = write_gguf(tmp_path / "tensor.gguf", tokens=300, tensor=True)
    truncate(with_tensor, with_tensor.stat().st_size - 100)
    code, err = run(capsys, "tokenizer", with_tensor, "-o", tmp_path / "t.json")
    one_line_error(code, err, "the data of tensor table")
    assert not (tmp_path / "t.json").exists()


def test_gguf_with_a_bad_vocabulary_is_one_line(tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "bad.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma4")
    writer.add_token_list(["<pad>", "<eos>", "a"])
    writer.add_token_types([gguf.TokenType.CONTROL] * 3)
    writer.add_token_merges(["a b"])  # "ab" is not in the vocabulary
    writer.add_bos_token_id(7)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    code, err = run(capsys, "tokenizer", path, "-o", tmp_path / "t.json")
    one_line_error(code, err, "bos token id 7 is outside the vocabulary")


# ---- 5. an output file in a missing directory --------------------------------------------------
@pytest.mark.parametrize("command", [["graph", "tiny-e"], ["logits", "tiny-e", "--random-weights", "--tokens", "2"]])
def test_output_in_a_missing_directory_is_refused_before_the_work(tmp_path, capsys, monkeypatch, command):
    import g4c.cli

    def no_work(*args, **kwargs):
        raise AssertionError("the work started before the output was checked")

    monkeypatch.setattr(g4c.cli, "_config", no_work)
    monkeypatch.setattr(g4c.cli, "_session", no_work)
    code, err = run(capsys, *command, "-o", tmp_path / "missing" / "out.x")
    one_line_error(code, err, f"directory {tmp_path / 'missing'} does not exist")
    (tmp_path / "dir.npy").mkdir()
    code, err = run(capsys, *command, "-o", tmp_path / "dir.npy")
    one_line_error(code, err, "is a directory")
    assert [p.name for p in tmp_path.iterdir()] == ["dir.npy"]


def test_artifact_under_a_file_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = run(capsys, "init-random", "tiny-e", "--layers", "1", "-o", tmp_path / "file" / "sub" / "ckpt")
    one_line_error(code, err, f"{tmp_path / 'file'} is not a directory")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


# ---- 6. absurd model sizes ---------------------------------------------------------------------
def test_absurd_vocabulary_is_refused_when_the_config_is_read(small_checkpoint, tmp_path, capsys):
    import json

    huge = tmp_path / "huge"
    huge.mkdir()
    config = json.loads((small_checkpoint / "config.json").read_text())
    (huge / "config.json").write_text(json.dumps({**config, "vocab_size": 10**12}))
    for command in (["init-random", huge, "-o", tmp_path / "out"], ["inspect", huge]):
        code, err = run(capsys, *command)
        one_line_error(code, err, "vocab_size: 1000000000000 is larger than g4c supports (at most 16777216")
    assert not (tmp_path / "out").exists()


def test_dimension_limits_hold_for_every_spelling():
    from g4c.config import ConfigError, ModelConfig, config_from_dict

    with pytest.raises(ConfigError, match="num_hidden_layers: 2000 is larger"):
        ModelConfig(num_hidden_layers=2000)
    with pytest.raises(ConfigError, match="num_hidden_layers: 5000 is larger"):  # before lists of layers are built
        config_from_dict({"model_type": "gemma4_text", "num_hidden_layers": 5000})
    with pytest.raises(ConfigError, match="per_layer_config.5.head_dim: 131072 is larger"):
        config_from_dict({"model_type": "gemma4_text", "num_hidden_layers": 6,
                          "per_layer_config": {"5": {"head_dim": 2**17}}})
    preset_config("31b")  # the largest real model is well inside


def test_init_random_checks_memory_and_disk_first(tmp_path, monkeypatch):
    import g4c.checkpoint as checkpoint

    cfg = preset_config("tiny-e", 2)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint, "_physical_memory", lambda: 200_000)  # the embedding is 131072 bytes
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 0, 10**9))
    write_random_checkpoint(cfg, tmp_path / "fits")
    monkeypatch.setattr(checkpoint, "_physical_memory", lambda: 100_000)
    with pytest.raises(G4CError, match=r"tensor embed_tokens.weight \[512, 64\] alone needs .* of memory"):
        write_random_checkpoint(cfg, tmp_path / "a" / "b")
    monkeypatch.setattr(checkpoint, "_physical_memory", lambda: 10**12)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    with pytest.raises(G4CError, match="the checkpoint needs .* on disk and .* has 0.0 MiB free"):
        write_random_checkpoint(cfg, tmp_path / "a" / "b")
    assert [p.name for p in tmp_path.iterdir()] == ["fits"]


# ---- 7. --overwrite keeps the old artifact until the new one is in place -----------------------
def make_old(out: Path) -> None:
    out.mkdir()
    (out / "manifest.json").write_text("old")


def contents(out: Path) -> str:
    return (out / "manifest.json").read_text()


def test_overwrite_swaps_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out"
    make_old(out)
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "manifest.json").write_text("new")
        assert contents(out) == "old"
    assert contents(out) == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failing_final_move_leaves_the_old_artifact(tmp_path, monkeypatch):
    """Before the fix the old directory was deleted first: a failure (or a kill) before the rename left
    nothing at the target path. Now the target holds the old or the new directory at every moment."""
    out = tmp_path / "out"
    make_old(out)
    real_rename = os.rename

    def failing_rename(src, dst, *args, **kwargs):  # moving the new one in fails; putting the old one back works
        if Path(dst) == out and not str(src).endswith(".replaced"):
            raise OSError("simulated crash while moving the new artifact in")
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", failing_rename)
    try:
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "manifest.json").write_text("new")
    except OSError:
        pass
    assert out.is_dir() and contents(out) in ("old", "new")
    # where the file system cannot swap: renamed aside, moved in; a failure puts the old one back
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    with pytest.raises(OSError, match="simulated crash"):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "manifest.json").write_text("newer")
    assert out.is_dir() and contents(out) in ("old", "new") and [p.name for p in tmp_path.iterdir()] == ["out"]
    monkeypatch.setattr(os, "rename", real_rename)
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "manifest.json").write_text("newest")
    assert contents(out) == "newest" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_writer_killed_between_the_renames_gets_its_old_artifact_back(tmp_path):
    out = tmp_path / "out"
    aside = tmp_path / f".out.{dead_pid()}.replaced"
    make_old(aside)  # what a writer killed after renaming `out` aside leaves
    remove_abandoned(out)
    assert contents(out) == "old" and [p.name for p in tmp_path.iterdir()] == ["out"]
    make_old(aside)  # its replacement made it: the old one is only deleted
    remove_abandoned(out)
    assert contents(out) == "old" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_replaces_a_file_and_a_link_not_what_it_points_to(tmp_path):
    target = tmp_path / "elsewhere"
    make_old(target)
    for out in (tmp_path / "file", tmp_path / "link"):
        out.write_text("x") if out.name == "file" else out.symlink_to(target)
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "manifest.json").write_text("new")
        assert contents(out) == "new" and not out.is_symlink()
    assert contents(target) == "old"


# ---- 8. the dead-writer clean-up matches its exact target name ---------------------------------
def test_cleanup_leaves_the_temporaries_of_longer_names_alone(tmp_path):
    dead = dead_pid()
    own = tmp_path / f".out.{dead}.abcdefgh"  # a dead writer of `out`: removed
    longer = tmp_path / f".out.{dead}.{os.getpid()}.abcdefgh"  # a running writer of `out.<dead>`
    other = tmp_path / f".out2.{dead}.abcdefgh"  # a dead writer of `out2`: not ours to judge
    dotted = tmp_path / f".out.v2.{dead}.abcdefgh"  # a dead writer of `out.v2`
    for d in (own, longer, other, dotted):
        d.mkdir()
        (d / "weights.safetensors").write_bytes(b"partial")
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert not own.exists() and longer.exists() and other.exists() and dotted.exists()
    stale = tmp_path / f".tokenizer.json.{dead}.abcdefgh"  # a killed atomic_file writer
    stale.write_text("partial")
    with atomic_file(tmp_path / "tokenizer.json") as tmp:
        tmp.write_text("{}")
    assert not stale.exists() and (tmp_path / "tokenizer.json").read_text() == "{}"


# ---- 9. artifacts follow the umask -------------------------------------------------------------
@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_directories_and_files_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    checkpoint = write_random_checkpoint(preset_config("tiny-dense", 1), tmp_path / "ckpt")
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "data.bin").write_bytes(b"x")
        (tmp / "run.sh").write_text("#!/bin/sh\n")
        (tmp / "run.sh").chmod(0o700)
    with atomic_file(tmp_path / "tokenizer.json") as tmp:
        tmp.write_text("{}")
    got = {**modes(checkpoint), **modes(tmp_path / "out"), **modes(tmp_path / "tokenizer.json")}
    directory, plain, executable = 0o777 & ~mask, 0o666 & ~mask, 0o777 & ~mask
    assert got == {"ckpt": directory, "ckpt/config.json": plain, "ckpt/model.safetensors": plain,
                   "out": directory, "out/sub": directory, "out/sub/data.bin": plain, "out/run.sh": executable,
                   "tokenizer.json": plain}


@pytest.fixture(scope="module")
def dense_artifact(tmp_path_factory) -> Path:
    art = tmp_path_factory.mktemp("dense") / "art"
    command = [sys.executable, "-m", "g4c.cli", "compile", "tiny-dense", "--random-weights", "-o", str(art),
               "--no-check", "--no-embed"]
    assert subprocess.run(command, capture_output=True).returncode == 0
    return art


@pytest.mark.parametrize("stage", [  # the default run kills the two stages that write; -m slow adds the others
    pytest.param("scheduling kernels", marks=pytest.mark.slow), "building library", "writing weights",
    pytest.param("self-check", marks=pytest.mark.slow)])
def test_compile_overwrite_killed_at_each_stage_keeps_a_whole_artifact(tmp_path, stage, dense_artifact):
    """kill -9 during `compile --overwrite`, at each stage: the target still holds a whole artifact (the
    old one, or the new one once it is in place), and the next compile cleans up after the dead writer."""
    import signal

    import g4c

    art = tmp_path / "art"
    base = [sys.executable, "-m", "g4c.cli", "compile", "tiny-dense", "--random-weights", "-o", str(art), "--no-embed"]
    shutil.copytree(dense_artifact, art)
    old = g4c.load(art).prefill([2, 17, 99])
    writer = subprocess.Popen(base + ["--overwrite", "--seed", "1"], stderr=subprocess.PIPE, text=True)
    for line in writer.stderr:
        if line.startswith(stage):
            os.kill(writer.pid, signal.SIGKILL)
            break
    writer.wait()
    assert writer.returncode in (-signal.SIGKILL, 0)
    now = g4c.load(art).prefill([2, 17, 99])  # whole and verified (every file's SHA-256)
    assert np.array_equal(now, old) or stage == "self-check"  # the new one is in place only at the end
    assert subprocess.run(base + ["--overwrite", "--no-check"], capture_output=True).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # the dead writer's leftovers are gone
