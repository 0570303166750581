"""Run an artifact on a remote device over TVM RPC (`g4c generate ART --rpc HOST:PORT`).

The client (this machine, with the compiler installed) uploads the artifact's kernel library to an
RPC server on the device (`python -m g4c.runtime.rpc_server`, which needs no compiler, or TVM's
own), loads it there as a Relax VM, copies the weights into device memory once, keeps the KV caches
there, and per step sends the token ids, positions and PLE rows and reads back the logits. The
library must be built for the device (e.g. `--target arm` for an aarch64 board).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from g4c.config import config_from_dict
from g4c.errors import G4CError
from g4c.runtime.artifact import LIBRARY, MANIFEST, POOLED_ALLOCATOR, artifact_weights, read_manifest
from g4c.runtime.session import Session

RPC_SESS_MASK = 128  # tvm.rpc.base: remote device types carry the session index above this


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise G4CError(f"--rpc wants HOST:PORT, got {address!r}")
    return host, int(port)


class RemoteSession(Session):
    """prefill/decode of an artifact whose kernels run on an RPC server."""

    def __init__(self, directory: str | Path, address: str, max_context: int | None = None,
                 prefill_chunk: int = 64, tracker_key: str | None = None):
        """`address` is the RPC server, or with `tracker_key` an RPC tracker that hands out a server
        registered under that key (`python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY`)."""
        import tvm
        from tvm import rpc

        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        if self.manifest.get("runtime", "relax-vm") != "relax-vm":
            raise G4CError(f"--rpc runs Relax VM artifacts; {self.manifest['target']} artifacts run through wgpu")
        host, port = parse_address(address)
        try:
            if tracker_key:
                tracker = rpc.connect_tracker(host, port)
                if tracker_key not in tracker.summary().get("queue_info", {}):  # request() would wait forever
                    raise G4CError(f"the RPC tracker at {address} has no device under key '{tracker_key}'")
                self.remote = tracker.request(tracker_key, priority=1, session_timeout=0)
            else:
                self.remote = rpc.connect(host, port)
        except G4CError:
            raise
        except Exception as exc:  # noqa: BLE001 - refused, unreachable: one line
            what = f"a '{tracker_key}' device from the RPC tracker" if tracker_key else "the RPC server"
            raise G4CError(f"cannot reach {what} at {address}: {str(exc).strip().splitlines()[-1]}") from None
        self.device = self.remote.cpu()
        self._item = self.remote.get_function("ffi.ArrayGetItem")
        self.remote.upload(str(self.directory / LIBRARY))
        try:
            library = self.remote.load_module(LIBRARY)
            self.vm = library["vm_load_executable"]()
            # the server sees its own device numbering: drop the RPC session bits of the device type
            self.vm["vm_initialization"](self.device.dlpack_device_type() % RPC_SESS_MASK, self.device.index,
                                         POOLED_ALLOCATOR)
        except Exception as exc:  # noqa: BLE001
            raise G4CError(f"the RPC server could not load the {self.manifest['target']} kernels: "
                           f"{str(exc).strip().splitlines()[-1]}") from None
        self.config = self.manifest["config"]
        model = config_from_dict(self.config, source=str(self.directory / MANIFEST))
        self.vocab_size = model.input_vocab_size
        self.max_context = min(max_context or 4096, model.max_position_embeddings)
        self.prefill_chunk = max(1, prefill_chunk)
        entry = self.manifest["entry"]
        weights, self._host_tables = artifact_weights(self.directory, self.manifest, model)
        self._new_tensor = tvm.runtime.tensor
        self._weights = [self._tensor(weights[n]) for n in entry["weights"]]
        del weights
        # full caches are passed whole: the attention kernels treat slots past the last position as empty
        self._shapes = {}
        for slot in entry["caches"]:
            info = self.manifest["kv_slots"][slot]
            rows = (info["window"] + self.prefill_chunk - 1) if info["ring"] else self.max_context
            self._shapes[slot] = (rows, info["kv_heads"], info["head_dim"])
        self._ple = entry["inputs"][2:] == ["ple_rows"]
        self.reset()

    def _tensor(self, array: np.ndarray):
        """A copy of `array` in the remote device's memory."""
        return self._new_tensor(np.ascontiguousarray(array), device=self.device)

    def reset(self) -> None:
        self._caches = [self._tensor(np.zeros(shape, np.float32)) for shape in self._shapes.values()]
        self.position = 0

    def _run(self, name: str, ids: np.ndarray) -> np.ndarray:
        length = self.position + ids.size
        inputs = [ids.astype(np.int64), np.arange(self.position, length, dtype=np.int64)]
        if self._ple:
            (table,) = self.manifest["host_tables"]
            view = self._host_tables[table]
            inputs.append(np.concatenate([view[int(i): int(i) + 1] for i in ids]).astype(np.float32))
        result = self.vm[name](*[self._tensor(a) for a in inputs], *self._weights, *self._caches)
        self.position = length
        return self._item(result, 0).numpy()  # the returned tuple stays remote: fetch the logits from it
