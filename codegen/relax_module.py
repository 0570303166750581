"""The model as a Relax IRModule: one entry function per program (`prefill`, `prefill_all`, `decode`;
a multimodal model's `prefill_media`, `prefill_all_media`, `encode_image`, `encode_audio`).

Each function takes the token ids and positions (T symbolic) or the inputs its program lists, the
gathered PLE rows when the model has PLE (the table stays in host memory; the runtime fetches one row
per token), every weight, and every KV cache buffer, and returns `(logits, *caches)` (an encoder:
`(embeddings, *caches)`, the caches untouched). Kernel steps become `R.call_tir` of the
scheduled TensorIR kernels; cache writes are `R.call_tir_inplace`, so the caches the runtime passes
in are updated in place (they are returned too, which keeps the writes alive through dead-code
elimination). Full caches are passed whole: the attention kernel's ring formula treats a cache
larger than every position as a plain full-length cache.
"""

from __future__ import annotations

from tvm import relax, tirx

from g4c.artifact import EntrySignature, Program
from g4c.codegen.kernels import take_last
from g4c.codegen.lower import Lowered

PLE_ROWS = "ple_rows"


def signature(lowered: Lowered) -> EntrySignature:
    weights = sorted({ref[2:] for p in lowered.programs.values() for s in p.steps for ref in s.args
                      if ref.startswith("w:")})
    inputs = ["ids", "positions"] + ([PLE_ROWS] if lowered.host_tables else [])
    return EntrySignature(inputs, weights, sorted(lowered.kv_slots))


def build_module(lowered: Lowered, sig: EntrySignature, kernels: dict[str, object],
                 weight_shapes: dict[str, tuple[tuple[int, ...], str]], static_decode: bool = False):
    """An IRModule with the scheduled kernels and one Relax function per program, parameters in
    `sig` order; `weight_shapes` gives each weight's stored shape and dtype.

    `static_decode`: `decode` takes exactly one token and every parameter is declared fixed
    (`num_input` 0): the runtime passes the same tensors on every step (inputs copied into them,
    whole caches), so TVM's RewriteCUDAGraph can capture the step as one CUDA graph and replay it."""
    bb = relax.BlockBuilder()
    gvars = {name: bb.add_func(func, name) for name, func in kernels.items()}
    last_kernels: dict[tuple, object] = {}
    for program in lowered.programs.values():
        _entry(bb, program, lowered, sig, gvars, weight_shapes, last_kernels,
               static=static_decode and program.name == "decode")
    return bb.get()


def _tensor(shape, dtype: str):
    return relax.TensorType(list(shape), dtype)


def _entry(bb, program: Program, lowered: Lowered, sig: EntrySignature, gvars, weight_shapes, last_kernels,
           static: bool = False) -> None:
    index = lowered.index_dtype  # ids/positions: int64 on CPUs, int32 on GPUs (Relax shapes stay int64)
    tokens = tirx.IntImm("int64", 1) if static else tirx.Var("T", "int64")
    dims = {"T": tokens}
    env: dict[str, relax.Expr] = {}
    inputs = program.inputs or [("ids", ["T"], index), ("positions", ["T"], index)]
    params = []
    for name, shape, dtype in inputs:  # symbolic dims (T, and an encoder's S) are shared by name
        shape = [dims.setdefault(d, tirx.Var(d, "int64")) if isinstance(d, str) else d for d in shape]
        params.append(relax.Var(name, _tensor(shape, dtype)))
        env[f"in:{name}"] = params[-1]
    if PLE_ROWS in sig.inputs and program.ple_width() is not None:
        width = program.ple_width()
        params.append(relax.Var(PLE_ROWS, _tensor((tokens, width), "float32")))
    for name in sig.weights:
        shape, dtype = weight_shapes[name]
        var = relax.Var(name.replace(".", "_"), _tensor(shape, dtype))
        params.append(var)
        env[f"w:{name}"] = var
    for slot in sig.caches:
        info = lowered.kv_slots[slot]
        capacity = tirx.Var(f"R_{slot}".replace(".", "_"), "int64")
        dims[f"kv:{slot}"] = _tensor((capacity, info.kv_heads, info.head_dim), "float32")
        var = relax.Var(slot.replace(".", "_"), dims[f"kv:{slot}"])
        params.append(var)
        env[f"kv:{slot}"] = var
    with bb.function(program.name, params, attrs={"num_input": 0} if static else None):
        with bb.dataflow():
            for step in program.steps:
                _emit(bb, step, program, lowered, env, dims, gvars, params, last_kernels)
            (result_ref,) = program.outputs.values()  # logits, or an encoder's embeddings
            outputs = [env[result_ref]] + [env[f"kv:{s}"] for s in sig.caches]
            result = bb.emit_output(relax.Tuple(outputs))
        bb.emit_func_output(result)


def _out_type(ref: str, program: Program, dims):
    shape, dtype = program.buffers[ref[2:]]
    return _tensor([dims.get(d, d) if isinstance(d, str) else d for d in shape], dtype)


def _emit(bb, step, program: Program, lowered: Lowered, env, dims, gvars, params, last_kernels) -> None:
    kernel, args = step.kernel, step.args
    if kernel == "rows":  # gathered by the runtime from the host-memory table
        env[args[1]] = next(p for p in params if p.name == PLE_ROWS)
        return
    if kernel == "reshape":
        env[args[1]] = bb.emit(relax.op.reshape(env[args[0]], _out_type(args[1], program, dims).shape))
        return
    if kernel == "last":
        count = step.attrs["count"]
        shape, dtype = program.buffers[args[1][2:]]
        trailing = tuple(shape[1:])
        key = (count, trailing, dtype)
        if key not in last_kernels:
            name = f"take_last_{count}_{'x'.join(map(str, trailing)) or 'scalar'}_{dtype}"
            last_kernels[key] = bb.add_func(take_last(count, trailing, dtype, name), name)
        env[args[1]] = bb.emit(relax.call_tir(last_kernels[key], [env[args[0]]], _out_type(args[1], program, dims)))
        return
    if lowered.kernels[kernel].op == "cache_write":  # updates the cache in place
        cache, new, pos = args
        env[cache] = bb.emit(relax.call_tir_inplace(gvars[kernel], [env[cache], env[new], env[pos]], [0],
                                                    dims[cache]))
        return
    inputs = [a for a in args if a in env]
    outputs = [a for a in args if a not in env]
    types = [_out_type(a, program, dims) for a in outputs]
    call = relax.call_tir(gvars[kernel], [env[a] for a in inputs], types if len(types) > 1 else types[0])
    value = bb.emit(call)
    if len(outputs) == 1:
        env[outputs[0]] = value
    else:
        for i, ref in enumerate(outputs):
            env[ref] = bb.emit(relax.TupleGetItem(value, i))
