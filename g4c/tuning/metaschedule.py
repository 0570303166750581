"""The second search space of `g4c tune`: TVM MetaSchedule's, for kernels with static shapes.

g4c's own knobs move the constants of a schedule g4c wrote; MetaSchedule (`tvm.s_tir.meta_schedule`)
searches whole schedules: it generates a design space of tilings, parallelisations, vectorisations and
unrollings for the kernel's TensorIR, samples it with an evolutionary search guided by a cost model
(XGBoost when `xgboost` is installed, else random), builds and times candidates with its own builder
and runner, and keeps them in its own database. It needs static shapes, so it tunes the kernels that
have them: decode's one-token linears (`linear`/`linear_q` with rows=1, the decode cost), with
weights small enough to be allocated per candidate (not the LM head: it streams at the bandwidth
with any reasonable schedule).

A session per kernel runs in `DIR/metaschedule/<kernel key>/` (MetaSchedule's JSON database, so its
logs and records stay beside g4c's); the best schedules it found are then timed the way every g4c
candidate is (`tuner.LocalDevice`, same inputs, best of repeats, against the hand schedule measured
in the same run) and recorded in g4c's database with space "metaschedule" and the schedule's trace
as the candidate, so `g4c compile --tuning-db` replays the trace (`apply`) when it is the best
record, and a database compares both spaces on the same clock.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

SPACE = "metaschedule"
OPS = ("linear", "linear_q")
MAX_ARGUMENT_BYTES = 256 << 20  # larger kernels' inputs (the LM head) are not allocated per candidate
TOP_K = 3  # MetaSchedule's best schedules re-timed by g4c
WORKER_TIMEOUT = 300.0  # seconds for one build or run in MetaSchedule's worker processes, start-up included


def cost_model() -> str:
    """XGBoost's cost model when installed (MetaSchedule's default), else random sampling."""
    return "xgb" if importlib.util.find_spec("xgboost") else "random"


def eligible(target, spec) -> bool:
    """Whether MetaSchedule tunes the kernel: a one-token linear (static shapes) whose weight is small
    enough to allocate for every candidate, on a target that tunes on this machine."""
    if spec.op not in OPS or spec.kwargs.get("rows") != 1 or not target.runs_here:
        return False
    return spec["n"] * spec["k"] * weight_bytes(spec.kwargs.get("scheme") or spec.kwargs.get("dtype", "float32")) \
        <= MAX_ARGUMENT_BYTES


def weight_bytes(storage: str) -> float:
    """Bytes per weight of a kernel's storage: a float dtype, or a quantization scheme with its group
    scales (at most fp32 each)."""
    import numpy as np

    from g4c.quant import BITS, GROUP

    if storage in BITS:
        return BITS[storage] / 8 + 4 / GROUP
    return np.dtype("float16" if storage == "bfloat16" else storage).itemsize


def search(target, task, work_dir: Path, trials: int) -> list[str]:
    """Run a MetaSchedule session of `trials` candidates on the task's kernel; the traces (JSON) of
    the best schedules it measured, best first. A session starts with a fixed cost (its builder and
    runner processes load TVM and its tensor intrinsics: ~30-60 s on 2 cores)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    work_dir.mkdir(parents=True, exist_ok=True)
    # a second session in one process: MetaSchedule re-lists its logger's handlers by name, and a handler
    # without one (added by the host application) makes its logging set-up fail
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    ms_logger.handlers = [h for h in ms_logger.handlers if h.get_name()]
    mod = tvm.IRModule({"main": target.unscheduled(task.spec).with_attr("global_symbol", "main")})
    # MetaSchedule's 30 s timeouts include a worker process's start-up (TVM and its tensor intrinsics):
    # on a loaded 2-core machine that alone can take longer, and every candidate would fail to build
    database = ms.tune_tir(mod, target.tvm_target(), str(work_dir), max_trials_global=trials,
                           num_trials_per_iter=min(trials, 16), cost_model=cost_model(),
                           builder=ms.builder.LocalBuilder(timeout_sec=WORKER_TIMEOUT),
                           runner=ms.runner.LocalRunner(timeout_sec=WORKER_TIMEOUT),
                           num_tuning_cores=os.cpu_count() or 1)
    workload = database.commit_workload(mod)
    return [tvm.ir.save_json(r.trace.as_json()) for r in database.get_top_k(workload, TOP_K)]


def apply(func, trace: str):
    """The kernel `func` scheduled by a MetaSchedule trace (a record's candidate)."""
    import tvm
    from tvm.s_tir import Schedule
    from tvm.s_tir.schedule import Trace

    symbol = func.attrs["global_symbol"]
    sch = Schedule(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}))
    Trace.apply_json_to_schedule(tvm.ir.load_json(trace), sch)
    return sch.mod["main"].with_attr("global_symbol", symbol)
