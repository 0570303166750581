"""Remote execution over TVM RPC: `g4c logits/generate ART --rpc HOST:PORT` against g4c's
compiler-free RPC server (`python -m g4c.runtime.rpc_server`). Here the server runs in a local
process that cannot import `tvm`; tests/test_arm.py runs it inside qemu-aarch64 for ARM artifacts."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import PROMPT
from hf_reference import reference_greedy, reference_logits
from rpc_farm import G4C_SERVER, NO_COMPILER, Farm, free_port

from g4c.cli import main


def start_server(command: list[str], port: int, sessions: int) -> subprocess.Popen:
    """Start an RPC server and wait for its 'listening' line (set-up output may come first)."""
    server = subprocess.Popen([*command, "--port", str(port), "--sessions", str(sessions)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    for line in server.stdout:
        if "listening" in line:
            return server
    raise AssertionError(f"the RPC server did not start: {server.stderr.read()[-2000:]}")


def run_remotely(artifact, port: int, tmp_path, capsys,
                 rpc_options: tuple[str, ...] = ()) -> tuple[np.ndarray, list[int]]:
    """Logits of PROMPT and 32 greedy tokens after PROMPT[:6], each in its own RPC session."""
    out = tmp_path / "logits.npy"
    rpc = ["--rpc", f"127.0.0.1:{port}", *rpc_options]
    assert main(["logits", str(artifact), *rpc, "--tokens", ",".join(map(str, PROMPT)), "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["generate", str(artifact), *rpc, "--tokens", ",".join(map(str, PROMPT[:6])),
                 "--max-new-tokens", "32", "--stop", "none", "--max-context", "64"]) == 0
    new = [int(t) for t in capsys.readouterr().out.strip().splitlines()[-1].split(",")]
    return np.load(out), new


@pytest.mark.parametrize("family", ["e", "moe"])
def test_rpc_server_without_compiler_runs_artifacts(family, artifacts, references, tmp_path, capsys):
    port = free_port()
    server = start_server([sys.executable, "-c", NO_COMPILER], port, sessions=2)
    try:
        logits, new = run_remotely(artifacts[family], port, tmp_path, capsys)
    finally:
        server.wait(timeout=60)
    assert server.returncode == 0
    assert np.abs(logits - reference_logits(references[family], PROMPT)).max() <= 1e-4
    assert new == reference_greedy(references[family], PROMPT[:6], 32)


def test_rpc_through_a_tracker_key(artifacts, references, tmp_path, capsys):
    """--rpc TRACKER --rpc-key KEY: the tracker hands out g4c's compiler-free server, registered under KEY
    with --tracker (one device: it offers itself again after each session)."""
    with Farm() as farm:
        farm.add(G4C_SERVER, "g4c-test")
        farm.wait("g4c-test", 1)
        assert main(["logits", str(artifacts["e"]), "--rpc", farm.address, "--rpc-key", "phone",
                     "--tokens", "2,3", "-o", str(tmp_path / "x.npy")]) == 1
        assert "has no device under key 'phone'" in capsys.readouterr().err
        logits, new = run_remotely(artifacts["e"], farm.port, tmp_path, capsys, ("--rpc-key", "g4c-test"))
        farm.wait("g4c-test", 1)  # offered again after the two sessions
    assert np.abs(logits - reference_logits(references["e"], PROMPT)).max() <= 1e-4
    assert new == reference_greedy(references["e"], PROMPT[:6], 32)


def test_rpc_errors_are_one_line(artifacts, checkpoints, capsys):
    port = free_port()  # nothing listens there
    assert main(["logits", str(artifacts["e"]), "--rpc", f"127.0.0.1:{port}", "--tokens", "2,3", "-o", "/tmp/x.npy"]) == 1
    assert main(["logits", str(artifacts["e"]), "--rpc", "nohostport", "--tokens", "2,3", "-o", "/tmp/x.npy"]) == 1
    assert main(["generate", str(checkpoints["e"]), "--rpc", "127.0.0.1:1", "--tokens", "2,3"]) == 1
    assert main(["generate", str(artifacts["e"]), "--rpc-key", "phone", "--tokens", "2,3"]) == 1
    err = capsys.readouterr().err
    assert "--rpc-key needs --rpc" in err
    assert "cannot reach the RPC server" in err and "--rpc wants HOST:PORT" in err
    assert "--rpc runs a compiled artifact" in err
