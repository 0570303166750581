"""The tuning database: a directory of measured schedules, shared by `g4c tune` and `g4c compile
--tuning-db`.

    DIR/meta.json        {"format": "g4c-tuning-db", "version": 1}
    DIR/records.jsonl    one JSON record per line, appended

A record is one measured candidate of one kernel: its key (the kernel's structural hash before
scheduling and its knob space, its op, the target, the TVM version), the search space it came from
("knobs": g4c's own schedule parameters; "metaschedule": a MetaSchedule trace), the candidate, and its
measured time per token-count bucket next to the hand schedule's. Each line carries a CRC-32 of its content.

Why this layout: every record is one `write()` of one line to a file opened for appending, under an
exclusive `flock`, then `fsync`ed — so a tuner killed at any moment (Ctrl-C, `kill -9`) leaves every
record it finished and no partial one, two tuners writing the same directory interleave whole lines,
and a resumed run reads what was measured and skips it. A line that does not parse or whose checksum
does not match (a damaged or truncated file) makes the whole database refused with one line: a
silently skipped record would silently change what compiles.
"""

from __future__ import annotations

import fcntl
import json
import os
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from g4c.errors import G4CError

FORMAT = "g4c-tuning-db"
VERSION = 1
META = "meta.json"
RECORDS = "records.jsonl"
EXPORT_FORMAT = "g4c-tuning-records"


class TuningDBError(G4CError):
    """A damaged, foreign or unreadable tuning database or export file."""


@dataclass(frozen=True)
class Key:
    kernel: str  # structural hash of the kernel before scheduling (hex)
    op: str
    target: str  # the TVM target, as its string
    tvm: str  # TVM version: schedules are measured with one compiler

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Record:
    key: Key
    space: str  # "knobs" or "metaschedule"
    candidate: dict  # the schedule parameters, or {"trace": MetaSchedule trace as JSON}
    times: dict[str, float]  # bucket → seconds per call
    baseline: dict[str, float]  # the hand schedule's, measured in the same run
    name: str = ""  # the kernel's display name (spec.name), for people reading the file
    when: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        """Hand-schedule time / this candidate's, summed over the buckets."""
        total = sum(self.times.values())
        return sum(self.baseline.values()) / total if total > 0 else 0.0

    @property
    def confirmed(self) -> bool:
        """Re-timed against the hand schedule in interleaved rounds (`g4c tune` confirms its best candidates)."""
        return bool(self.extra.get("confirmed"))

    @property
    def never_slower(self) -> bool:
        """Not slower than the hand schedule in any bucket (2% measurement noise allowed)."""
        return all(self.times[b] <= self.baseline[b] * 1.02 for b in self.times)

    def to_json(self) -> dict:
        data = asdict(self)
        data["key"] = self.key.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict) -> Record:
        values = dict(data)
        values["key"] = Key(**data["key"])
        record = cls(**values)
        if not (isinstance(record.candidate, dict) and isinstance(record.times, dict)
                and isinstance(record.baseline, dict) and set(record.times) == set(record.baseline)
                and all(isinstance(v, (int, float)) and v > 0 for v in [*record.times.values(),
                                                                         *record.baseline.values()])):
            raise ValueError("malformed candidate or times")
        return record


def _line(record: Record) -> str:
    body = json.dumps(record.to_json(), sort_keys=True, separators=(",", ":"))
    return json.dumps({"crc": zlib.crc32(body.encode()), "record": json.loads(body)}, sort_keys=True,
                      separators=(",", ":")) + "\n"


def _parse(line: str, where: str) -> Record:
    try:
        outer = json.loads(line)
        body = json.dumps(outer["record"], sort_keys=True, separators=(",", ":"))
        if zlib.crc32(body.encode()) != outer["crc"]:
            raise ValueError("checksum mismatch")
        return Record.from_json(outer["record"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TuningDBError(f"{where} is damaged ({exc}): restore it from an export, or remove that line") from None


class TuningDB:
    """A tuning database directory (created on first use when `create`)."""

    def __init__(self, directory: str | Path, create: bool = False):
        self.directory = Path(directory)
        self.meta, self.records_file = self.directory / META, self.directory / RECORDS
        if create and not self.directory.exists():
            self.directory.mkdir(parents=True)
        if create and not self.meta.exists():
            if any(self.directory.iterdir()):
                raise TuningDBError(f"{self.directory} is not a g4c tuning database (not empty, no {META})")
            self.meta.write_text(json.dumps({"format": FORMAT, "version": VERSION}) + "\n")
            self.records_file.touch()
        self._check_meta()

    def _check_meta(self) -> None:
        if not self.directory.is_dir():
            raise TuningDBError(f"{self.directory}: no such tuning database")
        try:
            meta = json.loads(self.meta.read_text())
        except (OSError, ValueError):
            raise TuningDBError(f"{self.directory} is not a g4c tuning database (no readable {META})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise TuningDBError(f"{self.directory} is not a g4c tuning database ({META} names another format)")
        if meta.get("version") != VERSION:
            raise TuningDBError(f"{self.directory}: tuning database version {meta.get('version')} is not the "
                                f"{VERSION} this g4c reads")
        if not self.records_file.is_file():
            raise TuningDBError(f"{self.directory} lacks {RECORDS}")

    def records(self) -> list[Record]:
        """Every record, each line checked (a damaged line refuses the database)."""
        with open(self.records_file, encoding="utf-8", errors="strict") as f:
            try:
                text = f.read()
            except UnicodeDecodeError:
                raise TuningDBError(f"{self.records_file} is damaged (not UTF-8 text)") from None
        if text and not text.endswith("\n"):
            raise TuningDBError(f"{self.records_file} is damaged (its last line is cut short)")
        return [_parse(line, f"{self.records_file} line {i + 1}")
                for i, line in enumerate(text.splitlines()) if line.strip()]

    def append(self, records: Iterable[Record]) -> None:
        """Append records: each one line, one write, flushed to disk, under an exclusive lock."""
        with open(self.records_file, "a", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                for record in records:
                    f.write(_line(record))
                    f.flush()
                    os.fsync(f.fileno())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def measured(self, key: Key) -> list[Record]:
        return [r for r in self.records() if r.key == key]

    def best(self, key: Key) -> Record | None:
        """The fastest candidate of a kernel that is never slower than its hand schedule, if it beats
        it; None: keep the hand schedule."""
        return best_of(self.measured(key))

    def best_by_kernel(self) -> dict[Key, Record]:
        grouped: dict[Key, list[Record]] = {}
        for record in self.records():
            grouped.setdefault(record.key, []).append(record)
        return {key: best for key, records in grouped.items() if (best := best_of(records)) is not None}

    # -- moving records between machines -----------------------------------------------------------------
    def export(self, path: Path) -> int:
        records = self.records()
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"format": EXPORT_FORMAT, "version": VERSION, "records": len(records)}) + "\n")
            f.writelines(_line(r) for r in records)
        return len(records)

    def import_(self, path: Path) -> int:
        """Append an export's records that this database does not hold yet; returns how many."""
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
            header = json.loads(lines[0]) if lines else None
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise TuningDBError(f"{path}: not a g4c tuning export ({exc})") from None
        if not isinstance(header, dict) or header.get("format") != EXPORT_FORMAT or header.get("version") != VERSION:
            raise TuningDBError(f"{path}: not a g4c tuning export (version {VERSION})")
        incoming = [_parse(line, f"{path} line {i + 2}") for i, line in enumerate(lines[1:]) if line.strip()]
        if len(incoming) != header.get("records"):
            raise TuningDBError(f"{path} is truncated: its header announces {header.get('records')} records, "
                                f"it holds {len(incoming)}")
        held = {_line(r) for r in self.records()}
        new = [r for r in incoming if _line(r) not in held]
        self.append(new)
        return len(new)


def best_of(records: Iterable[Record]) -> Record | None:
    """A kernel's fastest record that beats its hand schedule and is never slower in any bucket. Once
    the kernel has confirmed records, only they count: on a machine whose memory bandwidth drifts, one
    lucky measurement of a memory-bound kernel is not a win."""
    records = list(records)
    if any(r.confirmed for r in records):
        records = [r for r in records if r.confirmed]
    winners = [r for r in records if r.never_slower and r.speedup > 1.0]
    return max(winners, key=lambda r: r.speedup, default=None)

