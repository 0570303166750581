"""Write a directory all-or-nothing: build it under a temporary name beside the target, rename when
complete, remove it on any failure (used by `init-random` and `compile`). A process killed outright
(SIGKILL, the out-of-memory killer) cannot clean up: its temporary directory carries its PID, and the
next write of the same target removes it once that process is gone."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from g4c.errors import G4CError


def check_writable(out: Path, overwrite: bool) -> None:
    """Refuse to clobber a non-empty directory (or a file) unless `overwrite`."""
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise G4CError(f"{out} already exists and is not empty (pass --overwrite to replace it)")


@contextmanager
def atomic_directory(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces `out` when the block completes without error."""
    check_writable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_abandoned(out: Path) -> None:
    """Remove temporary directories of `out` left by writers that no longer run."""
    for tmp in out.parent.glob(f".{out.name}.*.*"):
        pid = tmp.name[len(out.name) + 2:].split(".", 1)[0]
        if tmp.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def atomic_file(out: Path) -> Iterator[Path]:
    """Yield a temporary path beside `out` that replaces it when the block completes without error."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    tmp = Path(name)
    try:
        os.close(fd)
        yield tmp
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
