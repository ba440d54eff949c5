"""Atomic writes and file locks: the one implementation every writer of the app uses.

Atomic write: the new content goes to a temp file in the target's folder, is
flushed and fsynced, renamed over the target (`os.replace`), and then the
folder is fsynced so the rename itself survives a power loss. A reader (or a
resume after a crash) finds the old file or the new one, never half of one
and never an empty file where a full one was.

Locks are `fcntl.flock` locks, held per open file and released by the kernel
when their holder exits, however it exits:

- `folder_lock`: take turns (processes that would build one cache file);
- `RunLock`: one writer only (a run folder); a second holder is refused at
  once with `LockHeld`, which names the process that holds it.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temp file beside ``path``; fsync it, rename it onto ``path``.

    Parameters
    ----------
    path : Path
        The file to (re)place. Its folder must exist.
    write : Callable[[Path], None]
        Writes the whole content to the path it is given (and closes what it opens).

    Notes
    -----
    The temp file keeps ``path``'s suffix, so writers that infer the format from
    the name (Pillow, imageio, matplotlib) still work. On any error the temp
    file is removed and ``path`` is left as it was.

    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix,
                                    dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        _fsync_path(tmp)  # the data is on disk before the rename can be
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)  # and the rename itself


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, value: Any, **dumps: Any) -> None:
    """Write ``json.dumps(value, **dumps)`` and a newline to ``path`` atomically."""
    import json

    write_text(path, json.dumps(value, **dumps) + "\n")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically (its folder made if missing)."""
    import torch  # only the writers of .pt files need it

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, save)


def fsync_folder(folder: Path) -> None:
    """Fsync a folder, so the names created or renamed in it survive a power loss."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # a platform that cannot open folders has nothing to fsync here
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse to fsync a folder; the file itself is synced
    finally:
        os.close(fd)


def _fsync_path(path: Path) -> None:
    """Fsync a file that was written (and closed) through its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (made if missing) for the block; wait for it.

    Processes that would build the same cache file at once take turns: the
    first builds it, the next ones find it. A folder that cannot be made or
    locked (read-only, a file system without locks) runs the block unlocked.
    """
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # no locks here: build unlocked, as before
        yield
    finally:
        os.close(fd)  # releases the lock


class LockHeld(OSError):
    """Another process (or another open of the file) holds a `RunLock`."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is locked by {holder}")
        self.path = Path(path)
        self.holder = holder  # "pid 123 on host h since 2025-01-01T12:00:00", or "unknown"


class RunLock:
    """An exclusive lock on a lock file, held until `release` or the holder's exit.

    The lock file keeps one line naming its holder (PID, host, since when),
    so a refused writer can say who is writing. The file is never removed:
    removing it would let two writers lock two different files of one name.
    """

    def __init__(self, path: Path) -> None:
        """A lock on ``path`` (created when taken); not taken yet."""
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock now or raise `LockHeld` naming its holder; never waits."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise LockHeld(self.path, holder) from None
        except BaseException:
            os.close(fd)
            raise
        since = datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} since {since}\n"
                 .encode())
        self._fd = fd

    def __del__(self) -> None:
        """Release a lock whose owner was dropped without releasing it."""
        if getattr(self, "_fd", None) is not None:
            self.release()

    def release(self) -> None:
        """Let the lock go (the holder line is cleared); later calls do nothing."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # releases the lock
