"""Autotuning: `g4c tune` measures candidate schedules of a model's kernels (`tuner.py`) into a tuning
database (`database.py`), and `g4c compile --tuning-db` builds with the best records."""

from g4c.tuning.database import Key, Record, TuningDB, TuningDBError

__all__ = ["Key", "Record", "TuningDB", "TuningDBError"]
