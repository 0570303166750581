"""`g4c tune`: measure candidate schedules of a model's distinct kernels and record them.

1. Extraction: the model is lowered as `g4c compile` lowers it; its programs' kernel specs are
   de-duplicated (the layers of one kind share kernels) and those with a search space on the target
   (`Target.knob_space`) become tasks, each measured at the token counts the runtime uses: `decode`
   (one token over a 512-position cache) and `prefill` (a 64-token chunk: the runtime's prefill chunk,
   over the cache it then sees).
2. Ordering: every task's hand schedule is measured first; tasks are tuned in order of their share of
   a step (time per call × calls per prefill chunk + decode step).
3. Search: g4c's own schedule knobs (a few dozen candidates per kernel), each candidate compiled and
   timed (`time_evaluator`, best of repeats) and appended to the database as it finishes; candidates a
   previous run measured are skipped (resume). The time budget and trial count bound the session.

Measurements run on this machine; other devices are measured through RPC (not yet).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from g4c.errors import G4CError
from g4c.tuning.database import Key, Record, TuningDB, best_of

DECODE_CONTEXT = 512  # cache positions behind a decode step while measuring
PREFILL_CHUNK = 64  # the runtime's prefill chunk (g4c.runtime.session)
BUCKETS = {"decode": 1, "prefill": PREFILL_CHUNK}  # bucket → tokens per call


@dataclass
class Task:
    spec: object  # KernelSpec
    key: Key
    calls: dict[str, int]  # bucket → calls per decode step / prefill chunk
    space: dict[str, list[int]]
    baseline: dict[str, float] = field(default_factory=dict)  # bucket → seconds per call (hand schedule)
    inputs: dict = field(default_factory=dict, repr=False)  # bucket → the kernel's input tensors

    @property
    def name(self) -> str:
        return self.spec.name

    def share(self) -> float:
        return sum(self.baseline[b] * self.calls[b] for b in self.calls)

    def candidates(self) -> list[dict]:
        """Every combination of the knobs but the hand schedule's own (the first values: the baseline)."""
        names = list(self.space)
        hand = tuple(self.space[n][0] for n in names)
        return [dict(zip(names, values)) for values in itertools.product(*(self.space[n] for n in names))
                if values != hand]


def kernel_key(target, spec) -> Key:
    import tvm
    import tvm_ffi

    func = target.unscheduled(spec)
    return Key(kernel=f"{tvm_ffi.structural_hash(func) & (2**64 - 1):016x}", op=spec.op,
               target=str(target.tvm_target()), tvm=tvm.__version__)


def extract_tasks(lowered, target, only: list[str] | None = None) -> list[Task]:
    """The distinct tunable kernels of a lowered model, with their calls per step."""
    calls: dict[str, dict[str, int]] = {}
    for program, bucket in (("decode", "decode"), ("prefill", "prefill")):
        for step in lowered.programs[program].steps:
            if step.kernel in lowered.kernels:
                per = calls.setdefault(step.kernel, {})
                per[bucket] = per.get(bucket, 0) + 1
    tasks = []
    for name in sorted(calls):
        spec = lowered.kernels[name]
        space = target.knob_space(spec)
        if not space or (only and name not in only and spec.op not in only):
            continue
        tasks.append(Task(spec, kernel_key(target, spec), calls[name], space))
    if only:
        unknown = [n for n in only if n not in calls and n not in {lowered.kernels[c].op for c in calls}]
        if unknown:
            raise G4CError(f"--kernels: {unknown[0]} is neither a kernel nor an op of this model "
                           f"(tunable: {', '.join(sorted({t.spec.op for t in tasks}) or ['none'])})")
    return tasks


def _arguments(func, tokens: int, spec) -> list[np.ndarray]:
    """Inputs of a kernel for a bucket: constant activations and weights (these kernels' speed does not
    depend on the values), valid positions."""
    window = spec.kwargs.get("window")
    slots = window + PREFILL_CHUNK - 1 if window else DECODE_CONTEXT
    sizes = {"T": tokens, "S": slots}
    arrays = []
    for param in func.params:
        shape = [int(d) if not hasattr(d, "name") else sizes[d.name] for d in param.shape]
        dtype = str(param.dtype)
        if param.name == "positions":
            last = DECODE_CONTEXT - 1
            arrays.append(np.arange(last - tokens + 1, last + 1, dtype=dtype))
        else:
            arrays.append(np.full(shape, 0x55 if dtype.startswith(("uint", "int")) else 0.01, dtype=dtype))
    return arrays


def measure(target, task: Task, knobs: dict | None, repeat: int = 5) -> dict[str, float]:
    """Seconds per call of the task's kernel scheduled with `knobs` (None: the hand schedule), per
    bucket: the best of `repeat` timings, each at least 20 ms of calls. The inputs are made once per
    task and bucket."""
    import tvm

    func = target.kernel(task.spec, knobs)
    library = tvm.compile(tvm.IRModule({"main": func}), target=target.tvm_target())
    device = tvm.cpu(0)
    evaluator = library.mod.time_evaluator("main", device, number=1, repeat=repeat, min_repeat_ms=20)
    if not task.inputs:
        unscheduled = target.unscheduled(task.spec)
        task.inputs = {bucket: [tvm.runtime.tensor(a, device) for a in _arguments(unscheduled, tokens, task.spec)]
                       for bucket, tokens in BUCKETS.items()}
    return {bucket: float(min(evaluator(*args).results)) for bucket, args in task.inputs.items()}


Progress = Callable[[dict], None]


def tune(tasks: list[Task], target, db: TuningDB, time_budget: float | None = None, trials: int | None = None,
         progress: Progress | None = None) -> dict[str, Record | None]:
    """Measure the hand schedules, then candidates in order of the tasks' share of a step, appending
    each measurement to `db`; returns each kernel's best record (None: the hand schedule stays)."""
    started = time.monotonic()
    report = progress or (lambda event: None)
    for i, task in enumerate(tasks):
        task.baseline = measure(target, task, None)
        task.inputs = {}  # made again when the task is tuned: all tasks' inputs at once could be GBs
        report({"stage": "baseline", "done": i + 1, "total": len(tasks), "kernel": task.name})
    tasks.sort(key=lambda t: -t.share())
    measured_total, best = 0, {}
    for task in tasks:
        held = db.measured(task.key)
        done = {_candidate_id(r.candidate) for r in held}
        todo = [c for c in task.candidates() if _candidate_id(c) not in done]
        for candidate in todo:
            if time_budget is not None and time.monotonic() - started > time_budget:
                break
            if trials is not None and measured_total >= trials:
                break
            try:
                times = measure(target, task, candidate)
            except Exception as exc:  # noqa: BLE001 - an illegal candidate (a split TVM refuses) is skipped
                report({"stage": "skip", "kernel": task.name, "candidate": candidate, "why": str(exc).splitlines()[-1:]})
                continue
            record = Record(task.key, "knobs", candidate, times, task.baseline, task.name, time.time(),
                            {"calls": task.calls})
            db.append([record])
            held.append(record)
            measured_total += 1
            winner = best_of(held)
            report({"stage": "tune", "kernel": task.name, "done": len(held),
                    "total": len(task.candidates()), "best": winner.speedup if winner else 1.0,
                    "elapsed": time.monotonic() - started, "budget": time_budget})
        best[task.name] = best_of(held)
        task.inputs = {}  # the next task's inputs take their place (an LM head's are 1.6 GB at fp32)
    return best


def _candidate_id(candidate: dict) -> tuple:
    return tuple(sorted(candidate.items()))
