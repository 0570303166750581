"""g4c's RPC server (`python -m g4c.runtime.rpc_server`) and the `--rpc` client against bad peers: a
fuzzing client misbehaves at every stage of the handshake and the protocol, and afterwards a real
`--rpc` run against the same server still matches the local artifact; uploads stay in the session
directory; sessions are reaped with their directories; SIGTERM removes the server's temporary
directory; the `--allow-sha256` list; the client's connect and idle timeouts. The server runs
with `tvm` blocked, as on a device, and with short timeouts."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import PROMPT
from test_rpc import NO_COMPILER, free_port

from g4c.cli import main

MAGIC = 0xFF271
MISMATCH = MAGIC + 2
HANDSHAKE_TIMEOUT = 1.0
IDLE_TIMEOUT = 2.0


class Server:
    """A compiler-free RPC server with short timeouts; its stderr goes to a file."""

    def __init__(self, tmp_path: Path, *options: str):
        self.port = free_port()
        self.stderr_path = tmp_path / f"server-{self.port}.err"
        self.stderr = open(self.stderr_path, "w")
        temp = tmp_path / f"tmp-{self.port}"  # its TMPDIR: the server's work directory is the one thing in it
        temp.mkdir()
        self.process = subprocess.Popen(
            [sys.executable, "-c", NO_COMPILER, "--port", str(self.port), "--handshake-timeout",
             str(HANDSHAKE_TIMEOUT), "--timeout", str(IDLE_TIMEOUT), *options],
            stdout=subprocess.PIPE, stderr=self.stderr, text=True, env={**os.environ, "TMPDIR": str(temp)})
        try:
            line = self.process.stdout.readline()
            assert "listening" in line, f"the RPC server did not start: {self.stderr_path.read_text()[-2000:]}"
            (self.work,) = temp.iterdir()
            assert self.work.is_dir() and self.work.name.startswith("g4c-rpc-")
        except BaseException:
            self.stop()
            raise

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def connect(self, timeout: float = 5.0) -> socket.socket:
        conn = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return conn

    def children(self) -> list[tuple[int, str]]:
        """(pid, state) of the server's child processes ('Z': a zombie)."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                fields = stat.rsplit(")", 1)[1].split()
                if int(fields[1]) == self.process.pid:
                    found.append((int(entry.name), fields[0]))
        return found

    def wait_idle(self, seconds: float = 10.0) -> None:
        """Until every session has ended and been reaped, and its directory removed."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not self.children() and not list(self.work.iterdir()):
                return
            time.sleep(0.1)
        raise AssertionError(f"sessions left behind: children {self.children()}, "
                             f"directories {sorted(p.name for p in self.work.iterdir())}")

    def log(self) -> str:
        self.stderr.flush()
        return self.stderr_path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # (SIGTERM: it removes its temporary directory)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.stderr.close()


@pytest.fixture
def server(tmp_path):
    started = Server(tmp_path)
    yield started
    started.stop()


def closed_by_server(conn: socket.socket, within: float) -> bytes:
    """What the server sends before it closes `conn`; fails if it is still open after `within` s."""
    conn.settimeout(within)
    received = b""
    try:
        while chunk := conn.recv(4096):
            received += chunk
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for {within} s") from None
    except ConnectionResetError:
        pass
    finally:
        conn.close()
    return received


def shut(conn: socket.socket) -> None:
    """Close `conn` even while another thread waits on it (close() alone would not wake it, nor send FIN)."""
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()


def handshake(conn: socket.socket, key: bytes = b"client:") -> bytes:
    conn.sendall(struct.pack("<ii", MAGIC, len(key)) + key)
    code, length = struct.unpack("<ii", recv_exactly(conn, 8))
    assert code == MAGIC
    return recv_exactly(conn, length)


def recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        assert chunk, "connection closed"
        data += chunk
    return data


def packet(code: int, payload: bytes = b"") -> bytes:
    """One RPC packet: its size (uint64), the code (int32), the payload."""
    return struct.pack("<Qi", 4 + len(payload), code) + payload


def drop_after_upload(server: Server, library: Path) -> None:
    """A real TVM client that uploads the kernels, loads them, and dies (SIGKILL) mid-session."""
    script = ("import os, signal, sys; from tvm import rpc; r = rpc.connect('127.0.0.1', int(sys.argv[1])); "
              "r.upload(sys.argv[2]); r.load_module(os.path.basename(sys.argv[2])); "
              "os.kill(os.getpid(), signal.SIGKILL)")
    result = subprocess.run([sys.executable, "-c", script, str(server.port), str(library)], capture_output=True,
                            timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]


def local_and_remote(artifact: Path, address: str, tmp_path, capsys) -> None:
    """`g4c logits` and `g4c generate` over RPC give what the artifact gives here."""
    tokens = ",".join(map(str, PROMPT[:8]))
    outputs = []
    for rpc in ((), ("--rpc", address)):
        out = tmp_path / f"logits{len(rpc)}.npy"
        assert main(["logits", str(artifact), *rpc, "--tokens", tokens, "-o", str(out)]) == 0
        capsys.readouterr()
        assert main(["generate", str(artifact), *rpc, "--tokens", tokens, "--max-new-tokens", "8", "--stop", "none",
                     "--max-context", "32"]) == 0
        outputs.append((np.load(out), capsys.readouterr().out.strip().splitlines()[-1]))
    (local_logits, local_tokens), (remote_logits, remote_tokens) = outputs
    assert remote_tokens == local_tokens
    assert np.abs(remote_logits - local_logits).max() <= 1e-5


def test_bad_peers_affect_only_their_own_session(server, artifacts, tmp_path, capsys):
    rng = random.Random(1234)
    library = artifacts["e"] / "kernels.so"
    assert library.is_file()
    short = HANDSHAKE_TIMEOUT + 2  # the server closes a stalled handshake within this

    # --- the handshake ---
    server.connect().close()  # a port scan / TCP health check
    for _ in range(3):  # garbage: not even the magic
        conn = server.connect()
        conn.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))))
        assert closed_by_server(conn, short) == b""
    conn = server.connect()
    conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert closed_by_server(conn, short) == b""
    conn = server.connect()  # a truncated magic, then close
    conn.sendall(struct.pack("<i", MAGIC)[:2])
    conn.close()
    conn = server.connect()  # the magic, then close before the key length
    conn.sendall(struct.pack("<i", MAGIC))
    conn.close()
    for length in (2 ** 31 - 1, 1 << 20, -1):  # absurd key lengths: refused at once, nothing buffered
        conn = server.connect()
        started = time.monotonic()
        conn.sendall(struct.pack("<ii", MAGIC, length) + b"client:")
        assert closed_by_server(conn, short) == b""
        assert time.monotonic() - started < HANDSHAKE_TIMEOUT  # not after the handshake deadline
    conn = server.connect()  # a truncated key, then close
    conn.sendall(struct.pack("<ii", MAGIC, 20) + b"client")
    conn.close()
    for key in (b"\xff\xfe\xc3\x28 \x80", b"client:\xff\xfe", b"client:wrong", b""):  # not UTF-8, wrong, empty
        conn = server.connect()
        conn.sendall(struct.pack("<ii", MAGIC, len(key)) + key)
        assert closed_by_server(conn, short) == struct.pack("<i", MISMATCH)

    # connections that stall in the handshake: at once, after the magic, in the key
    stalled = [server.connect() for _ in range(3)]
    stalled[1].sendall(struct.pack("<i", MAGIC))
    stalled[2].sendall(struct.pack("<ii", MAGIC, 7) + b"cli")
    from tvm import rpc

    started = time.monotonic()  # meanwhile a real client is served at once
    remote = rpc.connect("127.0.0.1", server.port)
    remote.upload(bytearray(b"x"), "probe.bin")
    assert time.monotonic() - started < HANDSHAKE_TIMEOUT
    del remote
    for conn in stalled:  # and the stalled ones are dropped after the deadline
        assert closed_by_server(conn, HANDSHAKE_TIMEOUT + 3) == b""

    # --- after the handshake: the session process ---
    conn = server.connect()  # a handshake and nothing more: ends after the idle timeout
    assert handshake(conn) == b"server:"
    started = time.monotonic()
    closed_by_server(conn, IDLE_TIMEOUT + 3)  # (after the runtime's shutdown packet)
    assert time.monotonic() - started > IDLE_TIMEOUT - 0.5
    conn = server.connect()  # a handshake, then close at once
    handshake(conn)
    conn.close()
    conn = server.connect()  # garbage instead of RPC packets
    handshake(conn)
    conn.sendall(bytes(rng.randrange(256) for _ in range(512)))
    closed_by_server(conn, IDLE_TIMEOUT + 3)
    conn = server.connect()  # an unknown packet code
    handshake(conn)
    conn.sendall(packet(12345, b"\0" * 16))
    closed_by_server(conn, IDLE_TIMEOUT + 3)
    for size in (2 ** 64 - 1, 2 ** 31):  # absurd packet sizes: refused at once, nothing buffered
        conn = server.connect()
        handshake(conn)
        started = time.monotonic()
        conn.sendall(struct.pack("<Qi", size, 0) + b"\0" * 64)
        closed_by_server(conn, IDLE_TIMEOUT + 3)
        assert time.monotonic() - started < IDLE_TIMEOUT
    conn = server.connect()  # a packet that claims 100 MiB and sends 1 KiB: ends after the idle timeout
    handshake(conn)
    conn.sendall(struct.pack("<Qi", 100 << 20, 3) + b"\0" * 1024)
    closed_by_server(conn, IDLE_TIMEOUT + 3)
    conn = server.connect()  # a truncated packet, then the client drops
    handshake(conn)
    conn.sendall(struct.pack("<Q", 100) + b"\0" * 10)
    conn.close()
    limited = rpc.connect("127.0.0.1", server.port, session_timeout=1)  # the client's own session time limit
    time.sleep(1.5)  # (less than the idle timeout)
    with pytest.raises(Exception):
        limited.get_function("ffi.ArrayGetItem")
    del limited
    drop_after_upload(server, library)  # a real client dies mid-session after its upload

    assert server.process.poll() is None, server.log()
    server.wait_idle()

    # a real --rpc run against the same server (with one more connection stalled meanwhile)
    stalled = server.connect()
    stalled.sendall(struct.pack("<i", MAGIC))
    local_and_remote(artifacts["e"], server.address, tmp_path, capsys)
    stalled.close()
    server.wait_idle()
    assert server.process.poll() is None
    log = server.log()
    assert "Traceback" not in log and "No such file or directory" not in log, log
    for expected in ("wrong magic", "key length of 2147483647", "key length of -1", "key mismatch",
                     "no handshake within", "idle for more than", "refused an RPC packet of 2147483648 bytes",
                     "in the middle of a packet"):
        assert expected in log, (expected, log)


def test_uploads_stay_in_the_session_directory(server, tmp_path):
    from tvm import rpc

    remote = rpc.connect("127.0.0.1", server.port)
    outside = tmp_path / "outside"
    outside.mkdir()
    names = ["../x", "../../x", "a/../../x", str(outside / "x"), "/x", "..", "./../x", "a\\..\\x"]
    for name in names:
        with pytest.raises(Exception, match="refuses the file name"):
            remote.upload(bytearray(b"owned"), name)
    for name in ("../x", str(outside / "y")):
        with pytest.raises(Exception, match="refuses the file name"):
            remote.download(name)
        with pytest.raises(Exception, match="refuses the file name"):
            remote.load_module(name)
        with pytest.raises(Exception, match="refuses the file name"):
            remote.remove(name)
    remote.upload(bytearray(b"fine"), "inside.bin")  # a plain name is fine (and can be read back)
    assert bytes(remote.download("inside.bin")) == b"fine"
    sessions = list(server.work.iterdir())
    assert len(sessions) == 1 and [p.name for p in sessions[0].iterdir()] == ["inside.bin"]
    assert list(outside.iterdir()) == []
    assert not (server.work / "x").exists() and not (server.work.parent / "x").exists()
    del remote
    server.wait_idle()  # the session's directory is gone with it


def test_allow_sha256(artifacts, tmp_path, capsys):
    allowed = artifacts["e"] / "kernels.so"
    other = artifacts["moe"] / "kernels.so"
    digest = hashlib.sha256(allowed.read_bytes()).hexdigest()
    server = Server(tmp_path, "--allow-sha256", digest.upper(), "--allow-sha256", "0" * 64)
    try:
        assert main(["generate", str(artifacts["e"]), "--rpc", server.address, "--tokens", "2,3",
                     "--max-new-tokens", "2"]) == 0
        capsys.readouterr()
        assert main(["generate", str(artifacts["moe"]), "--rpc", server.address, "--tokens", "2,3"]) == 1
        err = capsys.readouterr().err
        assert "could not load" in err and "not in the server's --allow-sha256 list" in err
        assert len(err.strip().splitlines()) == 1
        from tvm import rpc  # nor by calling the runtime's loader directly

        remote = rpc.connect("127.0.0.1", server.port)
        remote.upload(str(other))
        path = remote.get_function("tvm.rpc.server.workpath")("kernels.so")
        with pytest.raises(Exception, match="allow-sha256"):
            remote.get_function("ffi.ModuleLoadFromFile")(path)
        remote.upload(str(allowed), "allowed.so")
        remote.get_function("ffi.ModuleLoadFromFile")(remote.get_function("tvm.rpc.server.workpath")("allowed.so"))
        del remote
        server.wait_idle()
    finally:
        server.stop()
    bad = subprocess.run([sys.executable, "-c", NO_COMPILER, "--allow-sha256", "abc"], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a SHA-256 hex digest" in bad.stderr


def test_sigterm_removes_the_temporary_directory(server):
    from tvm import rpc

    remote = rpc.connect("127.0.0.1", server.port)  # a session in progress, with an upload
    remote.upload(bytearray(b"\0" * 1000), "kernels.so")
    stalled = server.connect()  # and a connection in its handshake
    assert len(server.children()) == 1 and list(server.work.glob("*/kernels.so"))
    children = [pid for pid, _ in server.children()]
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(10) == 0
    assert not server.work.exists()
    assert closed_by_server(stalled, 3) == b""
    for pid in children:
        assert not Path(f"/proc/{pid}").exists()
    assert "Traceback" not in server.log()


def test_sigint_removes_the_temporary_directory(server):
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(10) == 130
    assert not server.work.exists()


def test_client_connect_timeout_and_errors(artifacts, monkeypatch, capsys):
    """A server that accepts but never answers, and one that hangs up: one line each, in time."""
    silent = socket.create_server(("127.0.0.1", 0))
    rude = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    held = []

    def hold():  # accept and say nothing; hang up after 20 s (should the client's timeout not work)
        while not stop.is_set():
            try:
                held.append(silent.accept()[0])
            except OSError:
                return

    def give_up():
        for conn in held:
            shut(conn)

    def hang_up():
        while not stop.is_set():
            try:
                conn, _ = rude.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    threading.Thread(target=hold, daemon=True).start()
    watchdog = threading.Timer(20, give_up)
    watchdog.start()
    monkeypatch.setenv("G4C_RPC_CONNECT_TIMEOUT", "1")
    try:
        started = time.monotonic()
        assert main(["logits", str(artifacts["e"]), "--rpc", f"127.0.0.1:{silent.getsockname()[1]}", "--tokens",
                     "2,3", "-o", "/tmp/never.npy"]) == 1
        assert time.monotonic() - started < 5
        err = capsys.readouterr().err
        assert "the RPC server at 127.0.0.1:" in err and "did not answer within 1 s" in err
        assert len(err.strip().splitlines()) == 1
        assert main(["logits", str(artifacts["e"]), "--rpc", f"127.0.0.1:{rude.getsockname()[1]}", "--tokens", "2,3",
                     "-o", "/tmp/never.npy"]) == 1
        err = capsys.readouterr().err
        assert "cannot reach the RPC server" in err and len(err.strip().splitlines()) == 1
        monkeypatch.setenv("G4C_RPC_TIMEOUT", "soon")
        assert main(["logits", str(artifacts["e"]), "--rpc", "127.0.0.1:1", "--tokens", "2,3", "-o", "/x.npy"]) == 1
        assert "G4C_RPC_TIMEOUT must be a number of seconds" in capsys.readouterr().err
    finally:
        stop.set()
        watchdog.cancel()
        silent.close()
        rude.close()
        give_up()


def test_client_idle_timeout(server, artifacts, monkeypatch, capsys):
    """A server that stops answering mid-session (here: a proxy that stops forwarding its replies once
    the kernels are uploaded) fails the run with one line after G4C_RPC_TIMEOUT seconds."""
    library_size = (artifacts["e"] / "kernels.so").stat().st_size
    proxy = socket.create_server(("127.0.0.1", 0))
    sent = [0]
    conns = []

    def pump(source, target, upstream: bool):
        try:
            while data := source.recv(65536):
                if upstream:
                    sent[0] += len(data)
                elif sent[0] > library_size:  # the server's answers stop here
                    continue
                target.sendall(data)
        except OSError:
            pass

    def serve():
        try:
            client, _ = proxy.accept()
        except OSError:
            return
        upstream = socket.create_connection(("127.0.0.1", server.port))
        conns.extend([client, upstream])
        threading.Thread(target=pump, args=(client, upstream, True), daemon=True).start()
        pump(upstream, client, False)

    def hang_up():  # should the client's timeout not work: a failure after 20 s, not a hang
        for conn in conns:
            shut(conn)

    threading.Thread(target=serve, daemon=True).start()
    watchdog = threading.Timer(20, hang_up)
    watchdog.start()
    monkeypatch.setenv("G4C_RPC_TIMEOUT", "1")
    try:
        started = time.monotonic()
        assert main(["logits", str(artifacts["e"]), "--rpc", f"127.0.0.1:{proxy.getsockname()[1]}", "--tokens",
                     "2,3", "-o", "/tmp/never.npy"]) == 1
        assert time.monotonic() - started < 10
        err = capsys.readouterr().err
        assert "the server sent nothing for 1 s" in err and len(err.strip().splitlines()) == 1, err
    finally:
        watchdog.cancel()
        proxy.close()
        hang_up()
    server.wait_idle()


def test_a_session_that_dies_is_one_line_and_the_server_goes_on(server, artifacts, tmp_path, capsys):
    """The session process dies mid-generation: the client says so in one line; the next session works."""
    from g4c.errors import G4CError
    from g4c.runtime.remote import remote_executor
    from g4c.runtime.session import ArtifactSession

    session = ArtifactSession(artifacts["e"], remote_executor(server.address), 32)
    session.prefill(PROMPT[:4])
    ((child, _),) = server.children()
    os.kill(child, signal.SIGKILL)
    with pytest.raises(G4CError, match="failed to run decode: the server closed the session") as failure:
        session.decode(5)
    assert "\n" not in str(failure.value)
    del session
    server.wait_idle()
    assert "session 1 ended by SIGKILL" in server.log()
    local_and_remote(artifacts["e"], server.address, tmp_path, capsys)
    server.wait_idle()
