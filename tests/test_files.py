"""fedgan_app.files: atomic writes that reach the disk, and the locks, on real files."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fedgan_app import files
from fedgan_app.files import (
    LockHeld,
    RunLock,
    atomic_torch_save,
    atomic_write,
    folder_lock,
    write_bytes,
    write_json,
    write_text,
)


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every fsync that runs, as (kind, inode); the real fsync still runs."""
    calls: list[tuple[str, int]] = []
    real = os.fsync

    def spy(fd: int) -> None:
        info = os.fstat(fd)
        calls.append(("folder" if stat.S_ISDIR(info.st_mode) else "file", info.st_ino))
        real(fd)

    monkeypatch.setattr(files.os, "fsync", spy)
    return calls


def test_a_write_fsyncs_the_file_then_the_folder_it_is_renamed_in(
    tmp_path: Path, fsynced: list[tuple[str, int]]
) -> None:
    # Prepare: an old version of the file
    path = tmp_path / "metrics.csv"
    path.write_text("round\n")

    # Execute
    write_text(path, "round\n1\n")

    # Assert: the new content, fsynced as the file that now has the name, and the
    # folder fsynced after the rename; no temp file left
    assert path.read_text() == "round\n1\n"
    assert fsynced == [("file", path.stat().st_ino), ("folder", tmp_path.stat().st_ino)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "summary.json"
    path.write_text("old")

    def half_write(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    # Execute
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_write)

    # Assert
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_the_temp_file_keeps_the_suffix_writers_infer_the_format_from(tmp_path: Path) -> None:
    # Prepare
    seen: list[Path] = []

    # Execute
    atomic_write(tmp_path / "grid.png", lambda tmp: (seen.append(tmp), tmp.write_bytes(b"x")))

    # Assert
    assert seen[0].parent == tmp_path and seen[0].suffix == ".png"
    assert seen[0].name.startswith(".grid.png.")


def test_bytes_json_and_torch_helpers_write_what_they_are_given(
    tmp_path: Path, fsynced: list[tuple[str, int]]
) -> None:
    # Execute
    write_bytes(tmp_path / "a.bin", b"\x00\x01")
    write_json(tmp_path / "b.json", {"b": 1, "a": [2]}, sort_keys=True)
    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "new" / "c.pt")

    # Assert: each written, fsynced, and its folder too (a missing one made)
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.json").read_text() == '{"a": [2], "b": 1}\n'
    assert torch.equal(torch.load(tmp_path / "new" / "c.pt")["w"], torch.arange(3))
    assert [kind for kind, _ in fsynced] == ["file", "folder"] * 3
    assert fsynced[-1][1] == (tmp_path / "new").stat().st_ino


def test_folder_lock_makes_a_second_holder_wait_until_the_first_is_done(tmp_path: Path) -> None:
    # Prepare: another holder (a thread: each lock opens the folder anew, so it
    # is exclusive within one process too) takes the lock, lingers, then leaves
    folder, events = tmp_path / "cache" / "data", []
    held = threading.Event()

    def first() -> None:
        with folder_lock(folder):
            events.append("first in")
            held.set()
            time.sleep(0.5)  # without the lock, the second holder goes in meanwhile
            events.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    held.wait(timeout=30)

    # Execute
    with folder_lock(folder):
        events.append("second in")
    thread.join()

    # Assert: the folder was made; the second went in only after the first left
    assert folder.is_dir()
    assert events == ["first in", "first out", "second in"]


def test_folder_lock_on_a_folder_it_cannot_make_runs_the_block_unlocked(tmp_path: Path) -> None:
    # Prepare: a file where the folder's parent should be
    (tmp_path / "file").write_text("x")

    # Execute
    with folder_lock(tmp_path / "file" / "cache"):
        ran = True

    # Assert
    assert ran


# Holds a RunLock in another process until its stdin closes.
_HOLDER = """
import sys
from fedgan_app.files import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
sys.stdin.read()
"""


def test_run_lock_refuses_a_second_process_naming_the_holder_until_it_dies(
    tmp_path: Path,
) -> None:
    # Prepare: another process holds the lock
    path = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)],
                              cwd=Path(__file__).resolve().parents[1], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"

        # Execute: this process tries; then the holder is killed (no cleanup runs)
        with pytest.raises(LockHeld) as refused:
            RunLock(path).acquire()
        holder.kill()
        holder.wait(timeout=60)
        mine = RunLock(path)
        mine.acquire()
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.stdin.close()
        holder.stdout.close()

    # Assert: the refusal named the holder; now this process is named
    assert refused.value.holder.startswith(f"pid {holder.pid} on host {socket.gethostname()}")
    assert str(path) in str(refused.value)
    assert path.read_text().startswith(f"pid {os.getpid()} on host ")
    mine.release()
    assert path.read_text() == ""


def test_run_lock_is_exclusive_per_open_and_free_after_release(tmp_path: Path) -> None:
    # Prepare: flock locks belong to an open file, so two opens in one process conflict
    first, second = RunLock(tmp_path / ".lock"), RunLock(tmp_path / ".lock")
    first.acquire()

    # Execute
    with pytest.raises(LockHeld, match=f"pid {os.getpid()} "):
        second.acquire()
    first.release()
    second.acquire()

    # Assert
    assert second.held and not first.held
