"""Run a Vulkan (`--target vulkan`) artifact on a GPU through wgpu (wgpu-native: Vulkan, Metal, D3D12).

The artifact holds the WGSL of every kernel (`kernels.wgsl`) and, in the manifest, each program's
kernel calls and each kernel's launches (bindings, uniform words, grid; see `g4c.codegen.wgsl`).
This executor uploads the weights once, holds the KV caches the session plans, and runs a program by
recording every launch of it into one command buffer: one submission (and one read-back of the
logits) per prefill chunk or decode step. Activation buffers are kept per program and input sizes
(tokens T; an encoder's patches T and soft tokens S) and reused.

Nothing here imports TVM: numpy, safetensors and `wgpu` only. `WGPU_BACKEND_TYPE=Vulkan` forces
the Vulkan backend (CI runs on Mesa's lavapipe).
"""

from __future__ import annotations

import struct

import numpy as np

from g4c.artifact import SHADERS, ArtifactError, split_source
from g4c.errors import G4CError

MAX_GROUPS = 65535  # workgroups per grid dimension (WebGPU default limit)


def evaluate(tree, args: list[int]) -> int:
    """Value of a launch-size expression tree (`g4c.codegen.wgsl`): ints, ["arg", j], [op, a, b]."""
    if isinstance(tree, int):
        return tree
    op, a, b = tree[0], tree[1], tree[2] if len(tree) > 2 else None
    if op == "arg":
        return args[a]
    x, y = evaluate(a, args), evaluate(b, args)
    return {"+": x + y, "-": x - y, "*": x * y, "//": x // y, "%": x % y, "min": min(x, y), "max": max(x, y)}[op]


def _device(needs_f16: bool, needs_binding: int):
    import wgpu

    adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    if adapter is None:
        raise G4CError("no WebGPU/Vulkan adapter found (install a Vulkan driver, e.g. mesa-vulkan-drivers)")
    limits = adapter.limits
    if needs_binding > limits["max-storage-buffer-binding-size"]:
        raise G4CError(f"a tensor of {needs_binding} bytes exceeds this device's storage binding limit "
                       f"({limits['max-storage-buffer-binding-size']}): compile for a profile with a smaller "
                       "max_binding")
    features = ["shader-f16"] if needs_f16 else []
    if needs_f16 and "shader-f16" not in adapter.features:
        raise G4CError(f"{adapter.info['device']} has no shader-f16: compile with --dtype float32")
    wanted = ("max-storage-buffer-binding-size", "max-buffer-size", "max-storage-buffers-per-shader-stage",
              "max-compute-workgroup-storage-size", "max-compute-invocations-per-workgroup")
    device = adapter.request_device_sync(required_features=features,
                                         required_limits={k: limits[k] for k in wanted})
    return adapter, device


def workgroups(width: int, height: int) -> tuple[tuple[int, int, int], int]:
    """Dispatch size for a (width, height) grid and the kernel's packGridDimX: widths above the
    per-dimension limit fold into z, and the kernel skips blocks past packGridDimX = width - 1."""
    x = min(width, MAX_GROUPS)
    return (x, height, -(-width // x)), width - 1


class Kernels:
    """The compiled WGSL kernels of an artifact on one device, and how to launch them."""

    def __init__(self, device, sources: dict[str, str], launches: dict[str, list[dict]]):
        self.device, self.launches = device, launches
        self.pipelines = {}
        for launch in (x for group in launches.values() for x in group):
            name = launch["kernel"]
            if name in self.pipelines:
                continue
            if name not in sources:
                raise ArtifactError(f"{SHADERS} has no kernel {name}")
            module = device.create_shader_module(code=sources[name])
            self.pipelines[name] = device.create_compute_pipeline(layout="auto",
                                                                  compute={"module": module, "entry_point": name})

    def dispatch(self, compute, kernel: str, args: list[tuple]) -> None:
        """Record `kernel` on the compute pass; args are (buffer, shape, itemsize) per kernel parameter."""
        import wgpu

        for launch in self.launches[kernel]:
            words = [int(args[p][1][d]) for p, d in launch["scalars"]]
            width, height = (evaluate(g, words) for g in launch["grid"])
            if width == 0 or height == 0:
                continue
            groups, pack = workgroups(width, height)
            pod = struct.pack(f"<{len(words)}iI", *words, pack)  # PODArgs: shape words (i32), packGridDimX
            pod += b"\0" * (-len(pod) % 16)
            uniform = self.device.create_buffer_with_data(data=pod, usage=wgpu.BufferUsage.UNIFORM)
            pipeline = self.pipelines[launch["kernel"]]
            entries = [{"binding": i, "resource": {"buffer": args[p][0], "offset": 0,
                                                   "size": max(4, int(np.prod(args[p][1])) * args[p][2])}}
                       for i, p in enumerate(launch["buffers"])]
            entries.append({"binding": len(entries), "resource": {"buffer": uniform, "offset": 0, "size": len(pod)}})
            group = self.device.create_bind_group(layout=pipeline.get_bind_group_layout(0), entries=entries)
            compute.set_pipeline(pipeline)
            compute.set_bind_group(0, group)
            compute.dispatch_workgroups(*groups)


class WgpuExecutor:
    """Runs a Vulkan artifact's programs on a wgpu device."""

    def __init__(self, session):
        try:
            import wgpu  # noqa: F401 - the optional dependency of this executor
        except ImportError:
            raise G4CError(f"{session.manifest.target} artifacts run through wgpu: pip install 'g4c[vulkan]'") from None
        self.manifest = session.manifest
        try:
            self.sources = split_source((session.directory / SHADERS).read_text())
        except OSError as exc:
            raise ArtifactError(f"cannot read {SHADERS}: {exc}") from None
        self._activations: dict[tuple, dict[str, tuple]] = {}

    def upload_weights(self, weights: list[np.ndarray]) -> None:
        import wgpu

        needs_f16 = any(a.dtype == np.float16 for a in weights)
        self.adapter, self.device = _device(needs_f16, max((a.nbytes for a in weights), default=0))
        self.device_name = f"{self.adapter.info['device']} ({self.adapter.info['backend_type']})"
        self._storage = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC | wgpu.BufferUsage.COPY_DST
        self._weights = {f"w:{name}": (self.device.create_buffer_with_data(data=np.ascontiguousarray(a),
                                                                          usage=self._storage), a.shape, a.itemsize)
                         for name, a in zip(self.manifest.entry.weights, weights)}
        self.kernels = Kernels(self.device, self.sources, self.manifest.launches)

    def allocate_caches(self, shapes: dict[str, tuple[int, int, int]]) -> None:
        self._caches = {f"kv:{s}": (self.device.create_buffer(size=int(np.prod(shape)) * 4, usage=self._storage),
                                    shape) for s, shape in shapes.items()}

    def clear_caches(self) -> None:
        encoder = self.device.create_command_encoder()
        for buffer, _ in self._caches.values():
            encoder.clear_buffer(buffer)
        self.device.queue.submit([encoder.finish()])

    def run(self, name: str, inputs: list[np.ndarray], cache_rows: dict[str, int]) -> np.ndarray:
        program = self.manifest.programs[name]
        names = program.input_names
        sizes = self._sizes(program, inputs)
        buffers = self._program_buffers(program, sizes, inputs[:len(names)])
        queue = self.device.queue
        for input_name, array in zip(names, inputs):
            queue.write_buffer(buffers[f"in:{input_name}"][0], 0, array)
        for slot, rows in cache_rows.items():  # bound as the rows the program needs
            buffer, shape = self._caches[f"kv:{slot}"]
            buffers[f"kv:{slot}"] = (buffer, (rows, *shape[1:]), 4)
        encoder = self.device.create_command_encoder()
        compute = None
        for step in program.steps:
            kernel, args = step.kernel, step.args
            if kernel == "rows":  # the PLE rows follow the program's inputs
                queue.write_buffer(buffers[args[1]][0], 0, inputs[len(names)])
            elif kernel == "reshape":
                src = buffers[args[0]]
                buffers[args[1]] = (src[0], self._shape(program, args[1], sizes), src[2])
            elif kernel == "last":
                compute = self._end(compute)
                src, dst = buffers[args[0]], buffers[args[1]]
                size = int(np.prod(dst[1])) * dst[2]
                encoder.copy_buffer_to_buffer(src[0], int(np.prod(src[1])) * src[2] - size, dst[0], 0, size)
            else:
                compute = compute or encoder.begin_compute_pass()
                self.kernels.dispatch(compute, kernel, [buffers[a] for a in args])
        self._end(compute)
        (output,) = program.outputs.values()  # logits, or an encoder's embeddings
        result = buffers[output]
        queue.submit([encoder.finish()])
        data = queue.read_buffer(result[0], 0, int(np.prod(result[1])) * 4)
        return np.frombuffer(data, dtype=np.float32).reshape(result[1]).copy()

    @staticmethod
    def _end(compute):
        if compute is not None:
            compute.end()
        return None

    @staticmethod
    def _sizes(program, inputs: list[np.ndarray]) -> dict[str, int]:
        """The symbolic dims bound by this call's inputs: T (tokens or patches), S (an encoder's soft tokens)."""
        sizes = {"T": int(inputs[0].shape[0])}
        for (_, shape, _), array in zip(program.inputs, inputs):
            sizes.update({d: int(n) for d, n in zip(shape, array.shape) if isinstance(d, str)})
        return sizes

    @staticmethod
    def _shape(program, ref: str, sizes: dict[str, int]) -> tuple[int, ...]:
        shape, _ = program.buffers[ref[2:]]
        return tuple(sizes[d] if isinstance(d, str) else int(d) for d in shape)

    def _program_buffers(self, program, sizes: dict[str, int], inputs: list[np.ndarray]) -> dict[str, tuple]:
        """(buffer, shape, itemsize) of every reference of the program: weights, inputs and the
        activations for these sizes (allocated once per program and sizes)."""
        key = (program.name, *sorted(sizes.items()))
        if key not in self._activations:
            made = {}
            for ref, (shape, dtype) in program.buffers.items():
                dims = self._shape(program, f"a:{ref}", sizes)
                size = max(4, int(np.prod(dims)) * np.dtype(dtype).itemsize)
                made[f"a:{ref}"] = (self.device.create_buffer(size=size, usage=self._storage), dims,
                                    np.dtype(dtype).itemsize)
            for name, array in zip(program.input_names, inputs):
                made[f"in:{name}"] = (self.device.create_buffer(size=max(4, array.nbytes), usage=self._storage),
                                      array.shape, array.itemsize)
            made.update(self._weights)
            self._activations[key] = made
        return dict(self._activations[key])
