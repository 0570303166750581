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
4. MetaSchedule (`g4c.tuning.metaschedule`), after every task's knobs: a full schedule search on the
   kernels with static shapes (decode's linears), its best schedules recorded as traces.

Measurements run on this machine, or on the devices a TVM RPC tracker holds under a key (a farm of
boards or phones): candidates are spread over every free device, one at a time per device, each
compiled here, cross-linked by the target's export, uploaded and timed there.
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

    @property
    def name(self) -> str:
        return self.spec.name

    def share(self) -> float:
        return sum(self.baseline[b] * self.calls[b] for b in self.calls)

    def candidates(self) -> list[dict]:
        """Every combination of the knobs but the hand schedule's own (the first values: the baseline),
        those that change fewest knobs first: a short session tries every knob on its own before
        combinations (a GEMM's blocking has a few hundred)."""
        names = list(self.space)
        hand = tuple(self.space[n][0] for n in names)
        combos = [values for values in itertools.product(*(self.space[n] for n in names)) if values != hand]
        combos.sort(key=lambda values: sum(v != h for v, h in zip(values, hand)))  # stable: product order within
        return [dict(zip(names, values)) for values in combos]


def kernel_key(target, spec) -> Key:
    """The kernel's identity in a database: its unscheduled TensorIR (structural hash) and its knob
    space, whose first values are the hand schedule every record's speed-up is relative to: when g4c's
    schedules change, their old records no longer match (they are kept, not applied)."""
    import hashlib
    import json

    import tvm
    import tvm_ffi

    func = target.unscheduled(spec)
    space = json.dumps(target.knob_space(spec), sort_keys=True)
    identity = f"{tvm_ffi.structural_hash(func) & (2**64 - 1):016x}:{space}"
    return Key(kernel=hashlib.sha256(identity.encode()).hexdigest()[:16], op=spec.op,
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
    sizes = {"T": tokens, "t": tokens, "S": slots}  # TE kernels name the token count T, TVMScript ones t
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


def _timed(library_module, device, inputs: dict, repeat: int) -> dict[str, float]:
    evaluator = library_module.time_evaluator("main", device, number=1, repeat=repeat, min_repeat_ms=20)
    return {bucket: float(min(evaluator(*args).results)) for bucket, args in inputs.items()}


class LocalDevice:
    """Measures on this machine's CPU."""

    name = "local"

    def __init__(self):
        self.inputs: dict[str, dict] = {}  # task → bucket → input tensors (one task's at a time)

    def measure(self, target, task: Task, knobs: dict | None, repeat: int = 5) -> dict[str, float]:
        """Seconds per call of the task's kernel scheduled with `knobs` (None: the hand schedule), per
        bucket: the best of `repeat` timings, each at least 20 ms of calls. Inputs are made once per task."""
        import tvm

        library = tvm.compile(tvm.IRModule({"main": target.kernel(task.spec, knobs)}), target=target.tvm_target())
        device = tvm.cpu(0)
        return _timed(library.mod, device, self._inputs(target, task, device), repeat)

    def _inputs(self, target, task: Task, device) -> dict:
        import tvm

        if task.name not in self.inputs:  # the previous task's go: an LM head's are 1.6 GB at fp32
            unscheduled = target.unscheduled(task.spec)
            self.inputs = {task.name: {bucket: [tvm.runtime.tensor(a, device) for a in
                                                _arguments(unscheduled, tokens, task.spec)]
                                       for bucket, tokens in BUCKETS.items()}}
        return self.inputs[task.name]

    def release(self) -> None:
        self.inputs = {}


class RemoteDevice(LocalDevice):
    """A device handed out by a TVM RPC tracker under a key: each candidate is compiled here, exported
    as the target exports its libraries (cross-linked for arm), uploaded and timed on the device."""

    def __init__(self, tracker: str, key: str, index: int = 0):
        from tvm import rpc

        super().__init__()
        host, _, port = tracker.rpartition(":")
        try:
            self.session = rpc.connect_tracker(host, int(port)).request(key, session_timeout=0)
        except (ValueError, RuntimeError, OSError) as exc:
            raise G4CError(f"RPC tracker {tracker}: no device under key {key!r} ({str(exc).splitlines()[-1:]})") \
                from None
        self.name, self.uploads = f"{key}@{tracker}#{index}", 0

    def measure(self, target, task: Task, knobs: dict | None, repeat: int = 5) -> dict[str, float]:
        import tempfile
        from pathlib import Path

        import tvm

        library = tvm.compile(tvm.IRModule({"main": target.kernel(task.spec, knobs)}), target=target.tvm_target())
        self.uploads += 1
        name = f"g4c_tune_{self.uploads}.so"  # a new name each time: the device's dlopen caches by name
        with tempfile.TemporaryDirectory() as tmp:
            target.export(library, Path(tmp))
            self.session.upload(str(Path(tmp) / target.requirements().library), name)
        remote = self.session.load_module(name)
        device = self.session.cpu(0)
        return _timed(remote, device, self._inputs(target, task, device), repeat)


def devices_for(rpc_tracker: str | None, rpc_key: str | None, count: int | None = None) -> list:
    """This machine, or every device the tracker has under the key (`count` of them at most)."""
    if not rpc_tracker:
        return [LocalDevice()]
    if not rpc_key:
        raise G4CError("--rpc-tracker needs --rpc-key (the key the devices registered under)")
    from tvm import rpc

    host, _, port = rpc_tracker.rpartition(":")
    try:
        queue = rpc.connect_tracker(host, int(port)).summary()["queue_info"].get(rpc_key, {})
    except (ValueError, RuntimeError, OSError) as exc:
        raise G4CError(f"cannot reach the RPC tracker {rpc_tracker}: {str(exc).splitlines()[-1:]}") from None
    free = int(queue.get("free", 0))
    if free == 0:
        raise G4CError(f"RPC tracker {rpc_tracker} has no free device under key {rpc_key!r}")
    return [RemoteDevice(rpc_tracker, rpc_key, i) for i in range(min(free, count or free))]


Progress = Callable[[dict], None]
CONFIRM_TOP = 3  # a kernel's best candidates re-timed against its hand schedule
CONFIRM_ROUNDS = 3  # interleaved rounds of that re-timing


def tune(tasks: list[Task], target, db: TuningDB, time_budget: float | None = None, trials: int | None = None,
         progress: Progress | None = None, devices: list | None = None,
         metaschedule_trials: int = 0) -> dict[str, Record | None]:
    """Measure the hand schedules, then g4c's knob candidates in order of the tasks' share of a step,
    spread over `devices` (default: this machine), appending each measurement to `db` as it finishes;
    then (the expensive space after the cheap one), in the same order, a MetaSchedule session of
    `metaschedule_trials` candidates (0: none) on each kernel it can tune (`metaschedule.eligible`),
    whose best schedules are timed and recorded the same way. Returns each kernel's best record (None:
    the hand schedule stays)."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    devices = devices or [LocalDevice()]
    started = time.monotonic()
    report = progress or (lambda event: None)
    for i, task in enumerate(tasks):
        task.baseline = devices[0].measure(target, task, None)
        report({"stage": "baseline", "done": i + 1, "total": len(tasks), "kernel": task.name})
    devices[0].release()
    tasks.sort(key=lambda t: -t.share())
    measured_total = 0

    def out_of_budget() -> bool:
        return (time_budget is not None and time.monotonic() - started > time_budget
                or trials is not None and measured_total >= trials)

    with ThreadPoolExecutor(len(devices)) as pool:
        for task in tasks:
            held = db.measured(task.key)
            done = {_candidate_id(r.candidate) for r in held}
            todo = [c for c in task.candidates() if _candidate_id(c) not in done]
            idle, running = list(devices), {}
            while todo or running:
                while todo and idle and not out_of_budget() and measured_total + len(running) < (trials or 1 << 62):
                    device, candidate = idle.pop(), todo.pop(0)
                    running[pool.submit(device.measure, target, task, candidate)] = (device, candidate)
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    device, candidate = running.pop(future)
                    idle.append(device)
                    try:
                        times = future.result()
                    except Exception as exc:  # noqa: BLE001 - an illegal candidate (a split TVM refuses) is skipped
                        report({"stage": "skip", "kernel": task.name, "candidate": candidate,
                                "why": str(exc).splitlines()[-1:]})
                        continue
                    record = Record(task.key, "knobs", candidate, times, task.baseline, task.name, time.time(),
                                    {"calls": task.calls, "device": device.name})
                    db.append([record])
                    held.append(record)
                    measured_total += 1
                    winner = best_of(held)
                    report({"stage": "tune", "kernel": task.name, "done": len(held),
                            "total": len(task.candidates()), "best": winner.speedup if winner else 1.0,
                            "elapsed": time.monotonic() - started, "budget": time_budget, "device": device.name})
            _confirm(task, target, db, held, devices[0], report)
            for device in devices:
                device.release()
    if metaschedule_trials and type(devices[0]) is LocalDevice:  # its sessions time on this machine (not RPC yet)
        for task in tasks:  # bounded by the time budget and their own trial count, not by `trials`
            if time_budget is not None and time.monotonic() - started > time_budget:
                break
            held = db.measured(task.key)
            _metaschedule(task, target, db, held, metaschedule_trials, report, started, time_budget)
            _confirm(task, target, db, held, LocalDevice(), report)
    return {task.name: best_of(db.measured(task.key)) for task in tasks}


def _metaschedule(task: Task, target, db: TuningDB, held: list[Record], trials: int, report: Progress,
                  started: float, time_budget: float | None) -> None:
    """A MetaSchedule session on the task's kernel (once per database: a resumed run skips it), its best
    schedules timed here and appended to `db` and `held`."""
    from g4c.tuning import metaschedule

    if any(r.space == metaschedule.SPACE for r in held) or not metaschedule.eligible(target, task.spec):
        return
    report({"stage": "metaschedule", "kernel": task.name, "trials": trials, "cost_model": metaschedule.cost_model(),
            "elapsed": time.monotonic() - started, "budget": time_budget})
    traces = metaschedule.search(target, task, db.directory / "metaschedule" / task.key.kernel, trials)
    device = LocalDevice()
    for trace in traces:
        times = device.measure(target, task, {"trace": trace})
        record = Record(task.key, metaschedule.SPACE, {"trace": trace}, times, task.baseline, task.name, time.time(),
                        {"calls": task.calls, "device": device.name, "trials": trials,
                         "cost_model": metaschedule.cost_model()})
        db.append([record])
        held.append(record)
        winner = best_of(held)
        report({"stage": "tune", "kernel": task.name, "done": len(held), "total": len(task.candidates()) + len(traces),
                "best": winner.speedup if winner else 1.0, "elapsed": time.monotonic() - started,
                "budget": time_budget, "device": "metaschedule"})
    device.release()


def _confirm(task: Task, target, db: TuningDB, held: list[Record], device, report: Progress) -> None:
    """Re-time the best CONFIRM_TOP unconfirmed winners of a kernel against its hand schedule, in
    CONFIRM_ROUNDS interleaved rounds (the best of each), and record them as confirmed: from then on
    only confirmed records can win (`best_of`). A candidate measured once can look 1.5× faster because
    the machine's bandwidth rose for a moment; interleaving sees both schedules under the same drift."""
    confirmed = {_candidate_id(r.candidate) for r in held if r.confirmed}
    best_first: dict[tuple, Record] = {}  # candidate → its best unconfirmed record
    for r in sorted(held, key=lambda r: -r.speedup):
        if not r.confirmed and r.never_slower and r.speedup > 1.0 and _candidate_id(r.candidate) not in confirmed:
            best_first.setdefault(_candidate_id(r.candidate), r)
    contenders = list(best_first.values())[:CONFIRM_TOP]
    if not contenders:
        return
    hand: dict[str, float] = {}
    times = [dict[str, float]() for _ in contenders]
    for _ in range(CONFIRM_ROUNDS):
        _keep_best(hand, device.measure(target, task, None))
        for record, best in zip(contenders, times):
            _keep_best(best, device.measure(target, task, record.candidate))
    for record, best in zip(contenders, times):
        confirmation = Record(task.key, record.space, record.candidate, best, hand, task.name, time.time(),
                              {**record.extra, "device": device.name, "confirmed": True, "rounds": CONFIRM_ROUNDS})
        db.append([confirmation])
        held.append(confirmation)
    winner = best_of(held)
    report({"stage": "confirm", "kernel": task.name, "candidates": len(contenders),
            "best": winner.speedup if winner else 1.0})


def _keep_best(best: dict[str, float], times: dict[str, float]) -> None:
    for bucket, seconds in times.items():
        best[bucket] = min(best.get(bucket, seconds), seconds)


def _candidate_id(candidate: dict) -> tuple:
    return tuple(sorted(candidate.items()))
