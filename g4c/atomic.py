"""Write a directory all-or-nothing: build it under a temporary name beside the target, move it into
place when complete, remove it on any failure (used by `init-random` and `compile`).

Replacing an existing target (`--overwrite`) never leaves the target path empty: on Linux the new
directory and the old one are swapped in one step (renameat2 RENAME_EXCHANGE), then the old one is
deleted; where the file system cannot swap, the old one is renamed aside (`.NAME.PID.replaced`), the
new one moved in, and the old one deleted — and a writer killed between those two renames leaves the
old one aside, which the next write of the same target puts back.

A process killed outright (SIGKILL, the out-of-memory killer) cannot clean up: its temporary entries
are named `.NAME.PID.SUFFIX` (exactly: the target's name, the writer's PID, a suffix without dots), and
the next write of the same target removes those whose process is gone — only those of that exact
target name, never a concurrent writer's of a longer name that shares the prefix.

`mkdtemp`/`mkstemp` create private entries (0700, 0600); what is moved into place gets the modes an
ordinary `mkdir`/`open` would have given it under the process's umask, so artifacts can be shared.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from g4c.errors import G4CError

REPLACED = "replaced"  # suffix of an old target renamed aside while its replacement moves in


def check_writable(out: Path, overwrite: bool) -> None:
    """Refuse to clobber a non-empty directory (or a file) unless `overwrite`."""
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise G4CError(f"{out} already exists and is not empty (pass --overwrite to replace it)")
    parent = next((p for p in Path(out).absolute().parents if p.exists()), None)  # where the temporary goes
    if parent is None:
        raise G4CError(f"cannot create {out}: give a directory below /")
    if not parent.is_dir():
        raise G4CError(f"cannot create {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise G4CError(f"cannot create {out}: permission denied in {parent}")


def check_output_file(path: Path) -> None:
    """Before any work: `path` can be written as a file (its directory exists and is writable, and it
    is not a directory), so a long computation does not end in a traceback."""
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise G4CError(f"{path} is a directory: give a file name")
    if not parent.exists():
        raise G4CError(f"cannot write {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise G4CError(f"cannot write {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise G4CError(f"cannot write {path}: permission denied")


@contextmanager
def atomic_directory(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces `out` when the block completes without error."""
    out = Path(out)
    check_writable(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", dir=out.parent))
    except OSError as exc:
        raise G4CError(f"cannot create {out}: {exc.strerror or exc}") from None
    try:
        yield tmp
        share_like_umask(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        _remove(tmp)
        raise


def _move_into_place(tmp: Path, out: Path) -> None:
    """Move the complete `tmp` to `out`; an existing `out` stays at its path until `tmp` replaces it."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    if _exchange(tmp, out):  # one step: `out` holds the old entry, then the new one
        _remove(tmp)  # the old entry, now under the temporary name (the next write removes it if killed here)
        return
    aside = out.parent / f".{out.name}.{os.getpid()}.{REPLACED}"
    _remove(aside)
    os.rename(out, aside)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(aside, out)  # put the old one back
        raise
    _remove(aside)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where the C
    library or the file system cannot (then the caller renames in two steps)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28, some musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # e.g. a file system without RENAME_EXCHANGE
    raise OSError(code, os.strerror(code), str(b))


def _remove(path: Path) -> None:
    """Remove a file, link or directory tree at `path` if there is one (errors ignored)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def remove_abandoned(out: Path) -> None:
    """Remove the temporary entries of `out` left by writers that no longer run; an old `out` that a
    killed writer had renamed aside goes back to `out` when nothing replaced it."""
    out = Path(out)
    prefix = f".{out.name}."
    try:
        entries = [e for e in os.listdir(out.parent) if e.startswith(prefix)]
    except OSError:
        return
    for name in entries:
        pid = _writer_pid(name[len(prefix):])
        if pid is None or _alive(pid):
            continue
        entry = out.parent / name
        if name.endswith(f".{REPLACED}") and not os.path.lexists(out):
            try:
                os.rename(entry, out)
                continue
            except OSError:
                pass
        _remove(entry)


def _writer_pid(rest: str) -> int | None:
    """The PID in `PID.SUFFIX` (what follows `.NAME.` in a temporary name), or None when `rest` is
    not exactly that: `.out.5.123.abc` is a temporary of `out.5`, not of `out`."""
    parts = rest.split(".")
    if len(parts) != 2 or not parts[1] or not (parts[0].isascii() and parts[0].isdigit()) or len(parts[0]) > 9:
        return None
    return int(parts[0])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:  # Linux: read without changing it (threads)
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_like_umask(root: Path) -> None:
    """Give `root` and everything under it the modes `mkdir`/`open` give under the umask (directories
    0777 & ~umask, files 0666 & ~umask, or 0777 & ~umask when executable): the temporary directory
    and files were created private. Links are left alone."""
    mask = _umask()
    root = Path(root)
    paths = [root]
    if root.is_dir() and not root.is_symlink():
        for directory, dirs, files in os.walk(root):
            paths += [Path(directory) / n for n in dirs + files]
    for path in paths:
        st = path.lstat()
        if stat.S_ISDIR(st.st_mode):
            mode = 0o777
        elif stat.S_ISREG(st.st_mode):
            mode = 0o777 if st.st_mode & 0o100 else 0o666
        else:
            continue
        if stat.S_IMODE(st.st_mode) != mode & ~mask:
            os.chmod(path, mode & ~mask)


@contextmanager
def atomic_file(out: Path) -> Iterator[Path]:
    """Yield a temporary path beside `out` that replaces it when the block completes without error."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(out)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.{os.getpid()}.", dir=out.parent)
    tmp = Path(name)
    try:
        os.close(fd)
        yield tmp
        share_like_umask(tmp)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
