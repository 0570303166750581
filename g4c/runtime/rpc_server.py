"""A TVM RPC server that needs no compiler: `python -m g4c.runtime.rpc_server --port 9090`.

TVM's own server (`python -m tvm.exec.rpc_server`) imports the whole `tvm` package; a device that
only has numpy, `apache-tvm-ffi` and `libtvm_runtime.so` can still serve, because the RPC protocol
itself (`rpc.ServerLoop`) lives in the runtime library. This module does the rest: listen, the
handshake (`RPC_MAGIC`, `client:<key>` / `server:<key>`), and the two callbacks the client uses to
upload and load a library (`tvm.rpc.server.workpath`, `tvm.rpc.server.load_module`).

Bad peers affect only their own connection: the listening process does every handshake itself,
without blocking (a deadline of `--handshake-timeout` seconds each, key lengths capped), and forks one
process per session only after a valid handshake. A session reads the client's RPC packets whole
before the runtime sees them (sizes over `--max-packet` MiB end it), ends after `--timeout` seconds
without traffic (or at the client's own `-timeout=`), and always exits with `os._exit`; the listening
process reaps it and removes its upload directory. Uploads, downloads and loads stay inside the
session's directory. SIGTERM/SIGINT stop the server and remove its temporary directory.

With `--tracker HOST:PORT --key KEY` the server registers with a TVM RPC tracker
(`python -m tvm.exec.rpc_tracker`) as one device under KEY, as TVM's own server does: it offers itself
with a fresh match key, serves the one client the tracker hands it out to, and offers itself again once
that session has ended (a device times one kernel at a time: `g4c tune --rpc-tracker` spreads candidates
over a farm this way). An offer claimed by a client that never connects is renewed after a few seconds;
a lost tracker is reconnected.

Security: TVM RPC runs the code a client uploads, and its protocol lets a client read and write the
serving process's memory, so a server is only as safe as the network it listens on: it binds to
127.0.0.1 by default. `--allow-sha256 HASH` (repeatable) makes every library load check the file's hash.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import selectors
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

RPC_MAGIC = 0xFF271  # tvm.rpc.base
RPC_CODE_SUCCESS = RPC_MAGIC
RPC_CODE_MISMATCH = RPC_MAGIC + 2
RPC_TRACKER_MAGIC = 0x2F271  # tvm.rpc.base
TRACKER_PUT, TRACKER_UPDATE_INFO, TRACKER_GET_PENDING_MATCHKEYS, TRACKER_SUCCESS = 3, 5, 7, 0  # TrackerCode
TRACKER_PING_SECONDS = 2.0  # how often an offer is checked while nobody connects
UNUSED_OFFER_SECONDS = 6.0  # an offer claimed this long without a connection is renewed (TVM: 4 + ping)
TRACKER_TIMEOUT = 10.0
TRACKER_RETRY_SECONDS = 5.0
MAX_KEY_BYTES = 4096  # a handshake key is `client:<key> [-timeout=N]`: a longer length prefix is refused
MAX_PENDING = 64  # connections in their handshake at once; more are closed at once
HANDSHAKE_TIMEOUT = 5.0
IDLE_TIMEOUT = 600.0
POLL_SECONDS = 0.2  # how often the listening process reaps ended sessions and expires handshakes
MAX_PACKET_MIB = 1024  # the largest RPC packet a session accepts (a library upload is one packet)
COPY_CHUNK = 16 << 20  # TVM clients split tensor copies into packets of this size (GetCRTMaxPacketSize)
RECV_CHUNK = 1 << 20
# runtime functions a client could call to write files by path (outside the session directory)
FILE_WRITERS = ("runtime.SaveParamsToFile", "ffi.ModuleWriteToFile")


class HandshakeRefused(Exception):
    pass


class _Stop(BaseException):
    """SIGTERM/SIGINT in the listening process."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def log(message: str) -> None:
    print(f"g4c rpc server: {message}", file=sys.stderr, flush=True)


def confined_path(directory: Path, name: str) -> Path:
    """`name` inside `directory`, for uploads, downloads and loads; anything that could leave it is refused."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        raise PermissionError(f"g4c rpc server refuses the file name {name!r}")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise PermissionError(f"g4c rpc server refuses the file name {name!r}: absolute, or with '..'")
    path = directory / relative
    if not path.resolve().is_relative_to(directory.resolve()):
        raise PermissionError(f"g4c rpc server refuses the file name {name!r}: outside the session directory")
    return path


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Pending:
    """A connection in its handshake: the bytes received so far and its deadline."""

    def __init__(self, conn: socket.socket, address, deadline: float):
        self.conn, self.address, self.deadline = conn, address, deadline
        self.data = bytearray()
        self.needed = 8  # magic and key length; then the key

    def receive(self) -> bool:
        """Read what has arrived (never more than the handshake); True when the handshake is complete."""
        try:
            chunk = self.conn.recv(self.needed - len(self.data))
        except (BlockingIOError, InterruptedError):
            return False
        if not chunk:
            raise HandshakeRefused("closed during the handshake")
        self.data += chunk
        if len(self.data) >= 4 and struct.unpack_from("<i", self.data)[0] != RPC_MAGIC:
            raise HandshakeRefused("not a TVM RPC client (wrong magic)")
        if len(self.data) == 8 and self.needed == 8:
            length = struct.unpack_from("<i", self.data, 4)[0]
            if not 0 <= length <= MAX_KEY_BYTES:
                raise HandshakeRefused(f"refused a key length of {length} bytes")
            self.needed = 8 + length
        return len(self.data) == self.needed

    def key(self) -> tuple[str, list[str]]:
        words = bytes(self.data[8:]).decode("utf-8", errors="replace").split()
        return (words[0] if words else ""), words[1:]


class TrackerLink:
    """This server's registration with a TVM RPC tracker: the tracker's JSON protocol
    (`<int32 length><json>` messages after the tracker magic), as tvm.rpc.server speaks it."""

    def __init__(self, address: str, key: str, port: int, custom_addr: str | None = None):
        host, _, port_text = address.rpartition(":")
        if not host or not port_text.isdigit():
            raise ValueError(f"--tracker wants HOST:PORT, not {address!r}")
        self.address, self.key, self.port, self.custom_addr = (host, int(port_text)), key, port, custom_addr
        self.sock: socket.socket | None = None
        self.matchkey: str | None = None  # the key of the current offer; None: not offered (busy)
        self.unclaimed_since = time.monotonic()
        self.next_ping = 0.0

    def _call(self, message: list):
        text = json.dumps(message).encode()
        self.sock.sendall(struct.pack("<i", len(text)) + text)
        length = struct.unpack("<i", self._receive(4))[0]
        return json.loads(self._receive(length))

    def _receive(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("the tracker closed the connection")
            data += chunk
        return data

    def connect(self) -> None:
        self.close()
        self.sock = socket.create_connection(self.address, timeout=TRACKER_TIMEOUT)
        self.sock.sendall(struct.pack("<i", RPC_TRACKER_MAGIC))
        if struct.unpack("<i", self._receive(4))[0] != RPC_TRACKER_MAGIC:
            raise ConnectionError(f"{self.address[0]}:{self.address[1]} is not a TVM RPC tracker")
        info = {"key": f"server:{self.key}", "addr": [self.custom_addr, self.port]}
        if self._call([TRACKER_UPDATE_INFO, info]) != TRACKER_SUCCESS:
            raise ConnectionError("the tracker refused the server's information")

    def offer(self) -> None:
        """Put this device in the tracker's queue under a new match key."""
        self.matchkey = f"{self.key}:{secrets.token_hex(8)}"
        if self._call([TRACKER_PUT, self.key, [self.port, self.matchkey], self.custom_addr]) != TRACKER_SUCCESS:
            raise ConnectionError("the tracker refused the offer")
        self.unclaimed_since, self.next_ping = time.monotonic(), time.monotonic() + TRACKER_PING_SECONDS

    def check_offer(self) -> None:
        """Renew an offer a client claimed from the tracker but never used (as TVM's server does)."""
        now = time.monotonic()
        if self.matchkey is None or now < self.next_ping:
            return
        self.next_ping = now + TRACKER_PING_SECONDS
        if self.matchkey in self._call([TRACKER_GET_PENDING_MATCHKEYS]):
            self.unclaimed_since = now
        elif now - self.unclaimed_since > UNUSED_OFFER_SECONDS:
            self.offer()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.matchkey = None, None


class PacketChannel:
    """The session's socket as the runtime's RPC channel (`rpc.ServerLoop(fsend, frecv)`), one packet at a
    time: every client packet is `<uint64 size><size bytes>`, and the runtime reserves `size` bytes as
    soon as it reads a size. So a packet reaches it only once all its bytes have arrived, sizes over
    `max_packet` end the session, and memory follows what a client sends, not what it claims. Each
    receive or send waits at most `timeout` seconds (the socket's timeout): the idle timeout."""

    def __init__(self, sock: socket.socket, max_packet: int):
        self.sock, self.max_packet = sock, max_packet
        self.ready = memoryview(b"")  # a complete packet (with its size), being handed to the runtime

    def _read(self, size: int) -> bytes:
        data = self.sock.recv(size)
        if not data:
            raise ConnectionError("the client closed the connection in the middle of a packet")
        return data

    def _packet(self) -> bool:
        header = b""
        while len(header) < 8:
            data = self.sock.recv(8 - len(header))
            if not data:
                if header:
                    raise ConnectionError("the client closed the connection in the middle of a packet")
                return False  # between packets: the client is done
            header += data
        size = struct.unpack("<Q", header)[0]
        if size > self.max_packet:
            raise ValueError(f"refused an RPC packet of {size} bytes (--max-packet is {self.max_packet >> 20} MiB)")
        body = bytearray(header)
        while len(body) < 8 + size:
            body += self._read(min(RECV_CHUNK, 8 + size - len(body)))
        self.ready = memoryview(body)
        return True

    def receive(self, size: int) -> bytes:
        if not self.ready and not self._packet():
            return b""  # the runtime ends the session cleanly
        data, self.ready = self.ready[:size], self.ready[size:]
        return bytes(data)

    def send(self, data: bytes) -> int:
        view = memoryview(data)
        while view:  # send() rather than sendall(): the timeout is per call (idle), not for all of it
            view = view[self.sock.send(view):]
        return len(data)


def _session_limit(options: list[str]) -> float | None:
    """TVM clients ask for a session time limit with `-timeout=SECONDS` (rpc.connect(session_timeout=))."""
    for option in options:
        if option.startswith("-timeout="):
            try:
                seconds = float(option.removeprefix("-timeout="))
            except ValueError:
                continue
            if 0 < seconds < 2 ** 31:  # (not NaN, not beyond alarm()'s range)
                return seconds
    return None


class Server:
    def __init__(self, host: str, port: int, key: str = "", sessions: int | None = None,
                 timeout: float | None = IDLE_TIMEOUT, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 allow_sha256: list[str] | None = None, max_packet: int = MAX_PACKET_MIB << 20,
                 tracker: str | None = None, custom_addr: str | None = None):
        self.host, self.port, self.key, self.sessions = host, port, key, sessions
        self.tracker, self.custom_addr = tracker, custom_addr
        self.link: TrackerLink | None = None
        self.tracker_retry = 0.0
        self.max_packet = max_packet
        self.timeout, self.handshake_timeout = timeout, handshake_timeout
        self.allowed = {h.lower() for h in allow_sha256 or []}
        self.children: dict[int, Path] = {}  # pid → its session directory
        self.pending: dict[int, _Pending] = {}  # fd → connection in its handshake
        self.started = 0
        self.session_dir: Path | None = None  # set in a session process

    # --- the callbacks of the session processes (registered once, before any fork) ---

    def _workpath(self, name: str) -> str:
        if self.session_dir is None:
            raise PermissionError("no session directory")
        return str(confined_path(self.session_dir, name))

    def _check_library(self, path: str) -> None:
        if self.allowed:
            digest = sha256_file(path)
            if digest not in self.allowed:
                raise PermissionError(f"g4c rpc server refuses to load {Path(path).name}: its sha256 {digest} is "
                                      "not in the server's --allow-sha256 list")

    def _register_callbacks(self, tvm_ffi) -> None:
        tvm_ffi.register_global_func("tvm.rpc.server.workpath", self._workpath, override=True)

        def load_module(name):
            path = self._workpath(name)
            self._check_library(path)
            return tvm_ffi.load_module(path)

        tvm_ffi.register_global_func("tvm.rpc.server.load_module", load_module, override=True)
        # TVM clients ask for this and split tensor copies (the weights) into packets of that size
        tvm_ffi.register_global_func("tvm.rpc.server.GetCRTMaxPacketSize", lambda: min(COPY_CHUNK, self.max_packet),
                                     override=True)
        # every library load by path goes through a `ffi.Module.load_from_file.<format>` loader: with an
        # allow-list, each checks the file's hash (a client may call the loaders directly)
        if self.allowed:
            for name in tvm_ffi.registry.list_global_func_names():
                if name.startswith("ffi.Module.load_from_file."):
                    tvm_ffi.register_global_func(name, self._checked_loader(tvm_ffi.get_global_func(name)),
                                                 override=True)

        def refuse(*_args):
            raise PermissionError("g4c rpc server does not write files by path")

        for name in FILE_WRITERS:
            if tvm_ffi.get_global_func(name, allow_missing=True) is not None:
                tvm_ffi.register_global_func(name, refuse, override=True)

    def _checked_loader(self, loader):
        def load(path, *rest):
            self._check_library(str(path))
            return loader(path, *rest)
        return load

    # --- the listening process ---

    def serve(self) -> None:
        from g4c.runtime.relax_vm import import_tvm_ffi, load_runtime_libraries

        tvm_ffi = import_tvm_ffi()
        load_runtime_libraries(Path(__file__).parent, ["libtvm_runtime.so"])
        self._register_callbacks(tvm_ffi)
        server_loop = tvm_ffi.get_global_func("rpc.ServerLoop")
        self.parent, self.work = os.getpid(), None
        previous = {s: signal.signal(s, self._stop) for s in (signal.SIGTERM, signal.SIGINT)}
        selector = selectors.DefaultSelector()
        try:
            self.work = Path(tempfile.mkdtemp(prefix="g4c-rpc-"))
            with socket.create_server((self.host, self.port)) as listener:
                listener.setblocking(False)
                selector.register(listener, selectors.EVENT_READ)
                port = listener.getsockname()[1]  # (--port 0: the one the system chose)
                print(f"g4c rpc server listening on {self.host}:{port} (work directory {self.work})", flush=True)
                if self.tracker:
                    self.link = TrackerLink(self.tracker, self.key, port, self.custom_addr)
                while self.sessions is None or self.started < self.sessions:
                    for event, _ in selector.select(POLL_SECONDS):
                        if event.fileobj is listener:
                            self._accept(listener, selector)
                        else:
                            self._advance(self.pending.get(event.fd), selector, server_loop, listener)
                        if self.sessions is not None and self.started >= self.sessions:
                            break
                    self._expire(selector)
                    self._reap()
                    self._tend_tracker()
                for pending in list(self.pending.values()):
                    self._drop(pending, selector)
            while self.children:  # --sessions: wait for the last sessions
                self._reap()
                time.sleep(POLL_SECONDS)
        finally:
            if os.getpid() == self.parent:
                for number in previous:  # a second signal must not cut the clean-up short
                    signal.signal(number, signal.SIG_IGN)
                if self.link is not None:
                    self.link.close()
                for pending in list(self.pending.values()):
                    self._drop(pending, selector)
                self._stop_children()
                if self.work is not None:
                    shutil.rmtree(self.work, ignore_errors=True)
                for number, handler in previous.items():
                    signal.signal(number, handler)

    def _tend_tracker(self) -> None:
        """Registered, offered whenever no session runs, and offers nobody used renewed; a tracker that
        cannot be reached is retried every few seconds (the server keeps running)."""
        link = self.link
        if link is None or time.monotonic() < self.tracker_retry:
            return
        try:
            if link.sock is None:
                link.connect()
                log(f"registered with the tracker {self.tracker} under key {self.key!r}")
            if link.matchkey is None and not self.children:
                link.offer()
            link.check_offer()
        except (OSError, ValueError, struct.error) as exc:  # (ConnectionError and JSON errors are among them)
            log(f"tracker {self.tracker}: {exc}; retrying in {TRACKER_RETRY_SECONDS:g} s")
            link.close()
            self.tracker_retry = time.monotonic() + TRACKER_RETRY_SECONDS

    def _stop(self, signum, _frame):
        raise _Stop(signum)

    def _accept(self, listener: socket.socket, selector) -> None:
        try:
            conn, address = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # e.g. out of file descriptors: keep serving
            log(f"accept failed: {exc}")
            time.sleep(POLL_SECONDS)
            return
        if len(self.pending) >= MAX_PENDING:
            conn.close()
            return
        conn.setblocking(False)
        pending = _Pending(conn, address, time.monotonic() + self.handshake_timeout)
        self.pending[conn.fileno()] = pending
        selector.register(conn, selectors.EVENT_READ)

    def _drop(self, pending: _Pending, selector) -> None:
        self.pending.pop(pending.conn.fileno(), None)
        try:
            selector.unregister(pending.conn)
        except (KeyError, ValueError):
            pass
        pending.conn.close()

    def _expire(self, selector) -> None:
        now = time.monotonic()
        for pending in [p for p in self.pending.values() if p.deadline <= now]:
            log(f"connection from {pending.address[0]}:{pending.address[1]} refused: no handshake within "
                f"{self.handshake_timeout:g} s")
            self._drop(pending, selector)

    def _advance(self, pending: _Pending | None, selector, server_loop, listener) -> None:
        if pending is None:
            return
        try:
            if not pending.receive():
                return
            word, options = pending.key()
            pending.conn.settimeout(self.handshake_timeout)  # the reply is a few bytes
            expected = self.key if self.link is None else self.link.matchkey
            if expected is None or word != f"client:{expected}":
                pending.conn.sendall(struct.pack("<i", RPC_CODE_MISMATCH))
                raise HandshakeRefused("key mismatch")
            reply = f"server:{self.key}".encode()
            pending.conn.sendall(struct.pack("<ii", RPC_CODE_SUCCESS, len(reply)) + reply)
        except (HandshakeRefused, OSError) as exc:
            if not isinstance(exc, HandshakeRefused) or "closed" not in str(exc):
                log(f"connection from {pending.address[0]}:{pending.address[1]} refused: {exc}")
            self._drop(pending, selector)
            return
        self.pending.pop(pending.conn.fileno(), None)
        selector.unregister(pending.conn)
        if self.link is not None:
            self.link.matchkey = None  # this device is busy until the session ends
        self._fork(pending, _session_limit(options), server_loop, listener)

    def _fork(self, pending: _Pending, limit: float | None, server_loop, listener) -> None:
        self.started += 1
        try:
            directory = Path(tempfile.mkdtemp(prefix=f"session-{self.started}-", dir=self.work))
        except OSError as exc:  # e.g. a full disk: this session fails, the server goes on
            log(f"cannot start session {self.started}: {exc}")
            pending.conn.close()
            return
        stops = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # the child must not run the listener's handlers
        try:
            child = os.fork()  # one process per session, as TVM's server: sessions run side by side
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
            log(f"cannot fork a session: {exc}")
            pending.conn.close()
            shutil.rmtree(directory, ignore_errors=True)
            return
        if child == 0:
            status = 1
            try:
                for number in stops:
                    signal.signal(number, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
                listener.close()
                if self.link is not None and self.link.sock is not None:
                    self.link.sock.close()  # (the listening process's registration, not the session's)
                for other in self.pending.values():
                    other.conn.close()
                status = self._session(pending, directory, limit, server_loop)
            except BaseException as exc:  # noqa: BLE001 - a session's failure is one line, never a traceback
                why = str(exc).strip().splitlines() or [type(exc).__name__]
                log(f"session {self.started} ({pending.address[0]}) ended: {why[-1]}")
            finally:
                os._exit(status)  # never return into the listening process's code (its clean-up is not ours)
        self.children[child] = directory
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
        pending.conn.close()

    def _session(self, pending: _Pending, directory: Path, limit: float | None, server_loop) -> int:
        self.session_dir = directory
        conn = pending.conn
        conn.settimeout(self.timeout)  # a peer that sends (or reads) nothing for this long ends its session
        if limit:
            signal.alarm(max(1, round(limit)))  # the client's session time limit: SIGALRM ends the process
        channel = PacketChannel(conn, self.max_packet)
        try:
            server_loop(channel.send, channel.receive)  # returns when the client shuts the session down
        except Exception as exc:
            if isinstance(exc, TimeoutError) or "timed out" in str(exc):
                raise TimeoutError(f"idle for more than {self.timeout:g} s") from None
            raise
        finally:
            conn.close()
        return 0

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # (not ours to wait for after all)
                for directory in self.children.values():
                    shutil.rmtree(directory, ignore_errors=True)
                self.children.clear()
                return
            if pid == 0:
                return
            directory = self.children.pop(pid, None)
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
                if os.WIFSIGNALED(status):  # (a session's own failures are logged by the session)
                    log(f"session {directory.name.split('-')[1]} ended by {signal.Signals(os.WTERMSIG(status)).name}")

    def _stop_children(self) -> None:
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 2.0
        while self.children and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            shutil.rmtree(self.children.pop(pid), ignore_errors=True)


def serve(host: str, port: int, key: str = "", sessions: int | None = None, **options) -> None:
    Server(host, port, key, sessions, **options).serve()


def _sha256(text: str) -> str:
    if len(text) != 64 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise argparse.ArgumentTypeError(f"not a SHA-256 hex digest: {text!r}")
    return text.lower()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m g4c.runtime.rpc_server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; clients can run code here: use another "
                             "address only on a trusted network)")
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--key", default="", help="key the client must present (rpc.connect(..., key=KEY)); with "
                                                  "--tracker, the key the device registers under")
    parser.add_argument("--tracker", metavar="HOST:PORT",
                        help="register with this TVM RPC tracker as one device under --key")
    parser.add_argument("--custom-addr", metavar="HOST",
                        help="with --tracker: the address clients reach this server at (default: as the tracker sees it)")
    parser.add_argument("--sessions", type=int, default=None, help="exit after serving this many sessions")
    parser.add_argument("--timeout", type=float, default=IDLE_TIMEOUT,
                        help=f"end a session after this many seconds without traffic (0: never; default "
                             f"{IDLE_TIMEOUT:g})")
    parser.add_argument("--handshake-timeout", type=float, default=HANDSHAKE_TIMEOUT,
                        help=f"seconds a new connection has for its handshake (default {HANDSHAKE_TIMEOUT:g})")
    parser.add_argument("--allow-sha256", action="append", type=_sha256, default=[], metavar="HASH",
                        help="load only libraries with this SHA-256 (repeatable; sha256sum ART/kernels.so)")
    parser.add_argument("--max-packet", type=int, default=MAX_PACKET_MIB, metavar="MIB",
                        help=f"the largest RPC packet (a library upload) a session accepts (default {MAX_PACKET_MIB})")
    args = parser.parse_args(argv)
    if args.handshake_timeout <= 0 or args.timeout < 0 or args.max_packet < 1:
        parser.error("--handshake-timeout must be > 0, --timeout >= 0 and --max-packet >= 1")
    if args.tracker and not args.key:
        parser.error("--tracker needs --key (the key clients ask the tracker for)")
    try:
        serve(args.host, args.port, args.key, args.sessions, timeout=args.timeout or None,
              handshake_timeout=args.handshake_timeout, allow_sha256=args.allow_sha256,
              max_packet=args.max_packet << 20, tracker=args.tracker, custom_addr=args.custom_addr)
    except _Stop as stop:
        return 0 if stop.signum == signal.SIGTERM else 128 + stop.signum
    except Exception as exc:  # noqa: BLE001 - the port is taken, no libtvm_runtime.so, ...: one line
        print(f"g4c rpc server: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
