"""A farm of RPC devices on 127.0.0.1 for the tests: a TVM RPC tracker and servers registered with it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

# g4c's RPC server in a process that cannot import the compiler, as on a device
NO_COMPILER = "import sys; sys.modules['tvm'] = None; from g4c.runtime.rpc_server import main; sys.exit(main())"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Farm:
    """`with Farm() as farm:` starts a tracker; `farm.add(command, key)` starts a server registered under
    `key` (command is the server's command line without its --tracker/--key/--port options);
    `farm.wait(key, free)` waits until the tracker has `free` devices under `key`. Everything is killed on exit."""

    def __init__(self):
        pytest.importorskip("tornado")  # TVM's tracker needs it
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> Farm:
        self.processes.append(subprocess.Popen(
            [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(self.port),
             "--port-end", str(self.port + 1)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return self

    def __exit__(self, *_exc) -> None:
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.wait()

    def add(self, command: list[str], key: str) -> None:
        port = free_port()
        self.processes.append(subprocess.Popen(
            [*command, "--tracker", self.address, "--key", key, "--host", "127.0.0.1", "--port", str(port),
             "--port-end", str(port + 1)] if "tvm.exec.rpc_server" in command else
            [*command, "--tracker", self.address, "--key", key, "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def free(self, key: str) -> int:
        from tvm import rpc

        try:
            return int(rpc.connect_tracker("127.0.0.1", self.port).summary()["queue_info"].get(key, {}).get("free", 0))
        except RuntimeError:  # (the tracker is still starting)
            return 0

    def wait(self, key: str, free: int, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while self.free(key) < free:
            assert time.monotonic() < deadline, f"{free} RPC servers did not register under {key!r} within {seconds} s"
            time.sleep(0.5)


TVM_SERVER = [sys.executable, "-m", "tvm.exec.rpc_server"]
G4C_SERVER = [sys.executable, "-c", NO_COMPILER]
