"""Run an artifact on a remote device over TVM RPC (`g4c generate ART --rpc HOST:PORT`).

The client (this machine, with the compiler installed) uploads the artifact's kernel library to an
RPC server on the device (`python -m g4c.runtime.rpc_server`, which needs no compiler, or TVM's
own), loads it there as a Relax VM, copies the weights into device memory once, keeps the KV caches
there, and per step sends the program's inputs (token ids, positions, PLE rows; a media prefill's soft
rows; an image encoder's patches) and reads back its output (logits, or the encoder's embeddings). The
library must be built for the device (e.g. `--target arm` for an aarch64 board).
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import threading
from contextlib import contextmanager

import numpy as np

from g4c.errors import G4CError
from g4c.runtime.relax_vm import POOLED_ALLOCATOR

RPC_SESS_MASK = 128  # tvm.rpc.base: remote device types carry the session index above this
CONNECT_TIMEOUT = 30.0  # seconds for the connection and the handshake (G4C_RPC_CONNECT_TIMEOUT)
TIMEOUT = 600.0  # seconds the session waits for any one reply of the server (G4C_RPC_TIMEOUT; 0: forever)


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise G4CError(f"--rpc wants HOST:PORT, got {address!r}")
    return host, int(port)


def _seconds(variable: str, default: float) -> float:
    text = os.environ.get(variable)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise G4CError(f"{variable} must be a number of seconds, got {text!r}") from None
    if value < 0:
        raise G4CError(f"{variable} must be >= 0, got {text!r}")
    return value


def remote_executor(address: str, tracker_key: str | None = None, connect_timeout: float | None = None,
                    timeout: float | None = None):
    """An executor factory for `ArtifactSession`: the artifact's kernels run on the RPC server at
    `address`, or with `tracker_key` on a server an RPC tracker at `address` hands out
    (`python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY`). The timeouts default to
    $G4C_RPC_CONNECT_TIMEOUT and $G4C_RPC_TIMEOUT (seconds; 0 waits forever)."""
    if connect_timeout is None:
        connect_timeout = _seconds("G4C_RPC_CONNECT_TIMEOUT", CONNECT_TIMEOUT)
    if timeout is None:
        timeout = _seconds("G4C_RPC_TIMEOUT", TIMEOUT)
    return lambda session: RemoteExecutor(session, address, tracker_key, connect_timeout, timeout)


def _last_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__


def _open_fds() -> set[int]:
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            listed = [int(name) for name in os.listdir(directory)]
        except OSError:
            continue
        return {fd for fd in listed if _is_open(fd)}  # not the listing's own descriptor, closed by now
    return set()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _set_socket_timeouts(fds: set[int], seconds: float) -> None:
    """Receive and send timeouts on the session's sockets, which TVM's C++ client opened: a server that
    stops answering then fails the call instead of blocking forever."""
    whole = int(seconds)
    timeval = struct.pack("@ll", whole, int((seconds - whole) * 1e6))
    for fd in fds:
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            with socket.socket(fileno=os.dup(fd)) as sock:  # the options are the socket's, shared by the dup
                if sock.type == socket.SOCK_STREAM:
                    sock.setblocking(True)  # as TVM's client needs it (a default socket timeout would unset it)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        except OSError:
            continue


class RemoteExecutor:
    """Runs a Relax VM artifact's programs on an RPC server; weights and KV caches stay remote."""

    def __init__(self, session, address: str, tracker_key: str | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT, timeout: float = TIMEOUT):
        import tvm

        manifest = session.manifest
        if manifest.runtime != "relax-vm":
            raise G4CError(f"--rpc runs Relax VM artifacts; {manifest.target} artifacts run through {manifest.runtime}")
        self.address, self.timeout = address, timeout
        self.remote = self._connect(address, tracker_key, connect_timeout, timeout)
        with self._calls("set up the session"):
            self.device = self.remote.cpu()
            self._item = self.remote.get_function("ffi.ArrayGetItem")
            self.remote.upload(str(session.directory / manifest.library))
        try:
            library = self.remote.load_module(manifest.library)
            self.vm = library["vm_load_executable"]()
            # the server sees its own device numbering: drop the RPC session bits of the device type
            self.vm["vm_initialization"](self.device.dlpack_device_type() % RPC_SESS_MASK, self.device.index,
                                         POOLED_ALLOCATOR)
        except Exception as exc:  # noqa: BLE001
            raise G4CError(f"the RPC server could not load the {manifest.target} kernels: {self._why(exc)}") from None
        self._new_tensor = tvm.runtime.tensor

    @staticmethod
    def _connect(address: str, tracker_key: str | None, connect_timeout: float, timeout: float):
        """The RPC session, within `connect_timeout` seconds. TVM's client connects and shakes hands in
        C++ without a timeout, so that runs in a thread (it releases the GIL) this one stops waiting for."""
        from tvm import rpc

        host, port = parse_address(address)
        outcome: dict = {}

        def connect():
            try:
                if tracker_key:
                    tracker = rpc.connect_tracker(host, port)
                    if tracker_key not in tracker.summary().get("queue_info", {}):  # request() would wait forever
                        raise G4CError(f"the RPC tracker at {address} has no device under key '{tracker_key}'")
                    before = _open_fds()
                    remote = tracker.request(tracker_key, priority=1, session_timeout=0)
                else:
                    before = _open_fds()
                    remote = rpc.connect(host, port)
                if timeout:
                    _set_socket_timeouts(_open_fds() - before, timeout)
                outcome["remote"] = remote
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                outcome["error"] = exc

        worker = threading.Thread(target=connect, name="g4c-rpc-connect", daemon=True)
        worker.start()
        worker.join(connect_timeout or None)
        what = f"a '{tracker_key}' device from the RPC tracker" if tracker_key else "the RPC server"
        if worker.is_alive():  # the thread stays blocked until the peer closes or this process exits
            raise G4CError(f"{what} at {address} did not answer within {connect_timeout:g} s (is it a TVM RPC "
                           "server, and free? G4C_RPC_CONNECT_TIMEOUT sets the wait)")
        error = outcome.get("error")
        if isinstance(error, G4CError):
            raise error
        if error is not None:  # refused, unreachable, not an RPC server: one line
            raise G4CError(f"cannot reach {what} at {address}: {_last_line(error)}") from None
        return outcome["remote"]

    @contextmanager
    def _calls(self, what: str):
        """Failures of the remote calls inside as one line: the server closed the session, timed out, ..."""
        try:
            yield
        except G4CError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise G4CError(f"the RPC session with {self.address} failed to {what}: {self._why(exc)}") from None

    def _why(self, exc: Exception) -> str:
        line = _last_line(exc)
        if "Resource temporarily unavailable" in line:  # the socket timeouts set in _connect
            return f"the server sent nothing for {self.timeout:g} s (G4C_RPC_TIMEOUT sets the wait)"
        if any(sign in line for sign in ("code=kShutdown", "Connection reset", "Channel closes", "Broken pipe")):
            return f"the server closed the session (its log may say why): {line}"
        return line

    def _tensor(self, array: np.ndarray):
        """A copy of `array` in the remote device's memory."""
        return self._new_tensor(np.ascontiguousarray(array), device=self.device)

    def upload_weights(self, weights: list[np.ndarray]) -> None:
        with self._calls("upload the weights"):
            self._weights = [self._tensor(w) for w in weights]

    def allocate_caches(self, shapes: dict[str, tuple[int, int, int]]) -> None:
        self._shapes = shapes

    def clear_caches(self) -> None:
        with self._calls("clear the KV caches"):
            self._caches = [self._tensor(np.zeros(shape, np.float32)) for shape in self._shapes.values()]

    def run(self, program: str, inputs: list[np.ndarray], cache_rows: dict[str, int]) -> np.ndarray:
        # whole caches: the attention kernels treat slots past the last position as empty
        with self._calls(f"run {program}"):
            result = self.vm[program](*[self._tensor(a) for a in inputs], *self._weights, *self._caches)
            return self._item(result, 0).numpy()  # the returned tuple stays remote: fetch the output from it
