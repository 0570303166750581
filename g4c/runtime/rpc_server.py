"""A TVM RPC server that needs no compiler: `python -m g4c.runtime.rpc_server --port 9090`.

TVM's own server (`python -m tvm.exec.rpc_server`) imports the whole `tvm` package; a device that
only has numpy, `apache-tvm-ffi` and `libtvm_runtime.so` can still serve, because the RPC protocol
itself (`rpc.ServerLoop`) lives in the runtime library. This module does the rest: listen, the
handshake (`RPC_MAGIC`, `client:<key>` / `server:<key>`), and the two callbacks the client uses to
upload and load a library (`tvm.rpc.server.workpath`, `tvm.rpc.server.load_module`). Each session is
served by a forked process and uploads into its own temporary directory (removed on exit).
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import tempfile
from pathlib import Path

RPC_MAGIC = 0xFF271  # tvm.rpc.base
RPC_CODE_SUCCESS = RPC_MAGIC
RPC_CODE_MISMATCH = RPC_MAGIC + 2


def _receive(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("client closed the connection during the handshake")
        data += chunk
    return data


def _handshake(conn: socket.socket, key: str) -> bool:
    """TVM's handshake: the client sends RPC_MAGIC and `client:<key> [options]`."""
    if struct.unpack("<i", _receive(conn, 4))[0] != RPC_MAGIC:
        return False
    length = struct.unpack("<i", _receive(conn, 4))[0]
    words = _receive(conn, length).decode().split()
    if not words or words[0] != f"client:{key}":
        conn.sendall(struct.pack("<i", RPC_CODE_MISMATCH))
        return False
    reply = f"server:{key}".encode()
    conn.sendall(struct.pack("<ii", RPC_CODE_SUCCESS, len(reply)) + reply)
    return True


def serve(host: str, port: int, key: str = "", sessions: int | None = None) -> None:
    import tvm_ffi

    from g4c.runtime.relax_vm import load_runtime_libraries

    load_runtime_libraries(Path(__file__).parent, ["libtvm_runtime.so"])
    work = tempfile.TemporaryDirectory(prefix="g4c-rpc-")
    # each session uploads into its own directory: overwriting a library another session has mapped
    # would crash it
    session_dir = {"path": Path(work.name)}
    tvm_ffi.register_global_func("tvm.rpc.server.workpath", lambda name: str(session_dir["path"] / name),
                                 override=True)
    tvm_ffi.register_global_func("tvm.rpc.server.load_module",
                                 lambda name: tvm_ffi.load_module(str(session_dir["path"] / name)), override=True)
    server_loop = tvm_ffi.get_global_func("rpc.ServerLoop")
    with socket.create_server((host, port)) as listener:
        print(f"g4c rpc server listening on {host}:{port}", flush=True)
        children = []
        while sessions is None or len(children) < sessions:
            conn, _ = listener.accept()
            if not _handshake(conn, key):
                conn.close()
                continue
            child = os.fork()  # one process per session, as TVM's server: sessions run side by side
            if child == 0:
                listener.close()
                session_dir["path"] = Path(tempfile.mkdtemp(dir=work.name))
                server_loop(conn.detach())  # owns and closes the socket; returns when the session ends
                os._exit(0)
            conn.close()
            children.append(child)
        for child in children:
            os.waitpid(child, 0)
    work.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m g4c.runtime.rpc_server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--key", default="", help="key the client must present (rpc.connect(..., key=KEY))")
    parser.add_argument("--sessions", type=int, default=None, help="exit after serving this many sessions")
    args = parser.parse_args(argv)
    try:
        serve(args.host, args.port, args.key, args.sessions)
    except (OSError, RuntimeError) as exc:
        print(f"g4c rpc server: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
