"""Run an artifact on a remote device over TVM RPC (`g4c generate ART --rpc HOST:PORT`).

The client (this machine, with the compiler installed) uploads the artifact's kernel library to an
RPC server on the device (`python -m g4c.runtime.rpc_server`, which needs no compiler, or TVM's
own), loads it there as a Relax VM, copies the weights into device memory once, keeps the KV caches
there, and per step sends the token ids, positions and PLE rows and reads back the logits. The
library must be built for the device (e.g. `--target arm` for an aarch64 board).
"""

from __future__ import annotations

import numpy as np

from g4c.errors import G4CError
from g4c.runtime.relax_vm import POOLED_ALLOCATOR

RPC_SESS_MASK = 128  # tvm.rpc.base: remote device types carry the session index above this


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise G4CError(f"--rpc wants HOST:PORT, got {address!r}")
    return host, int(port)


def remote_executor(address: str, tracker_key: str | None = None):
    """An executor factory for `ArtifactSession`: the artifact's kernels run on the RPC server at
    `address`, or with `tracker_key` on a server an RPC tracker at `address` hands out
    (`python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY`)."""
    return lambda session: RemoteExecutor(session, address, tracker_key)


class RemoteExecutor:
    """Runs a Relax VM artifact's programs on an RPC server; weights and KV caches stay remote."""

    def __init__(self, session, address: str, tracker_key: str | None = None):
        import tvm
        from tvm import rpc

        manifest = session.manifest
        if manifest.runtime != "relax-vm":
            raise G4CError(f"--rpc runs Relax VM artifacts; {manifest.target} artifacts run through {manifest.runtime}")
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
        self.remote.upload(str(session.directory / manifest.library))
        try:
            library = self.remote.load_module(manifest.library)
            self.vm = library["vm_load_executable"]()
            # the server sees its own device numbering: drop the RPC session bits of the device type
            self.vm["vm_initialization"](self.device.dlpack_device_type() % RPC_SESS_MASK, self.device.index,
                                         POOLED_ALLOCATOR)
        except Exception as exc:  # noqa: BLE001
            raise G4CError(f"the RPC server could not load the {manifest.target} kernels: "
                           f"{str(exc).strip().splitlines()[-1]}") from None
        self._new_tensor = tvm.runtime.tensor

    def _tensor(self, array: np.ndarray):
        """A copy of `array` in the remote device's memory."""
        return self._new_tensor(np.ascontiguousarray(array), device=self.device)

    def upload_weights(self, weights: list[np.ndarray]) -> None:
        self._weights = [self._tensor(w) for w in weights]

    def allocate_caches(self, shapes: dict[str, tuple[int, int, int]]) -> None:
        self._shapes = shapes

    def clear_caches(self) -> None:
        self._caches = [self._tensor(np.zeros(shape, np.float32)) for shape in self._shapes.values()]

    def run(self, program: str, inputs: list[np.ndarray], cache_rows: dict[str, int]) -> np.ndarray:
        # whole caches: the attention kernels treat slots past the last position as empty
        result = self.vm[program](*[self._tensor(a) for a in inputs], *self._weights, *self._caches)
        return self._item(result, 0).numpy()  # the returned tuple stays remote: fetch the logits from it
