"""Staging folders beside an output path, a lock on the path, and the atomic move into place.

A staging folder is named ``.<name>.partial-<host>-<pid>-<random>`` in the output's parent, so a
later run can tell a dead process's leftovers (SIGKILL cannot be caught) from a live one's and sweep
only those. An existing output is replaced by one atomic exchange of the two folders (Linux
renameat2 RENAME_EXCHANGE, macOS renamex_np RENAME_SWAP), so a reader sees the old folder or the new
one, never neither. Where the platform has no exchange, the old folder is moved aside first
(``.<name>.old-...``) and a later run puts it back if the process died in between.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from exporter.errors import UserError

_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"
_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


def _tag(out: Path, kind: str) -> str:
    return f".{out.name}.{kind}-"


def new_stage(out: Path, kind: str = "partial") -> Path:
    """An empty folder beside out that names this host and process."""
    try:
        return Path(tempfile.mkdtemp(prefix=f"{_tag(out, kind)}{_HOST}-{os.getpid()}-", dir=out.parent))
    except OSError as exc:
        raise UserError(f"cannot write into {out.parent}: {exc.strerror or exc}; choose a writable --out") from None


def _owner(entry: str, prefix: str) -> tuple[str, int] | None:
    """(host, pid) from a staging name made by new_stage, or None for any other name."""
    parts = entry[len(prefix):].rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to judge
        return True
    return True


def sweep_stale(out: Path) -> list[Path]:
    """Remove the staging folders of out left by dead processes on this host (and put back an old
    folder that a dead process had moved aside); returns what it removed or restored."""
    handled = []
    if not out.parent.is_dir():
        return handled
    for kind in ("partial", "old"):
        prefix = _tag(out, kind)
        for entry in sorted(os.listdir(out.parent)):
            owner = _owner(entry, prefix) if entry.startswith(prefix) else None
            path = out.parent / entry
            if owner is None or owner[0] != _HOST or _alive(owner[1]) or path.is_symlink() or not path.is_dir():
                continue
            if kind == "old" and not os.path.lexists(out):
                os.rename(path, out)
            else:
                shutil.rmtree(path, ignore_errors=True)
            handled.append(path)
    return handled


def discard(stage: Path) -> None:
    shutil.rmtree(stage, ignore_errors=True)


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2 / renamex_np with flags; False where the platform or filesystem lacks them."""
    libc = ctypes.CDLL(None, use_errno=True)
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        rc = libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags)
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        rc = libc.renamex_np(os.fsencode(src), os.fsencode(dst), {_RENAME_EXCHANGE: 0x2, _RENAME_NOREPLACE: 0x4}[flags])
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def publish(stage: Path, out: Path) -> None:
    """Move the finished stage to out, replacing an existing out in one atomic exchange."""
    if not os.path.lexists(out):
        if not _rename2(stage, out, _RENAME_NOREPLACE):
            os.rename(stage, out)
        return
    if _rename2(stage, out, _RENAME_EXCHANGE):
        discard(stage)  # it now holds the old folder
        return
    old = new_stage(out, "old")
    os.replace(out, old)  # POSIX: a folder replaces an empty one; sweep_stale restores it after a crash
    try:
        os.rename(stage, out)
    except BaseException:
        os.rename(old, out)  # put the old folder back before the caller discards the stage
        raise
    discard(old)


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on out (``.<name>.lock`` beside it) or fail at once if another process
    holds it; the lock file is removed on release."""
    path = out.parent / f".{out.name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise UserError(f"cannot lock {out} ({path}: {exc.strerror or exc}); choose a writable --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{out} is being written by another mistral-export process (pid {holder}); "
                            "wait for it to finish, or choose another --out") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino  # not unlinked by a holder releasing it
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)
