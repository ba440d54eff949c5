"""Share a machine's cores among the clients that train on it at the same moment.

In a simulation, several ClientApps run side by side on one machine, each in
its own process with a fixed torch thread count. When the clients of a round
do not fill the last wave (5 clients on 2 one-CPU slots: waves of 2, 2 and
1), a fixed count leaves cores idle. A `CoreShare` instead registers the
client in a small folder shared by the run's clients on this machine, and
while it trains it asks every few steps how many of them are active, taking
its share of the cores: two active clients on two cores get one thread each,
the one client left in the last wave gets both.

Only this module touches the folder (one empty file per active client,
named by its process id); crashed clients' files are ignored because their
process is gone.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from types import TracebackType

# Read the folder at most this often (seconds): counting is a directory listing.
MIN_INTERVAL_S = 0.25


def machine_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class CoreShare:
    """Work-conserving thread counts for the clients active on this machine.

    Parameters
    ----------
    run_key : str
        Identifies the run; clients of one run share a folder.
    cores : int | None
        Cores to share (default: all cores of this machine).
    root : Path | None
        Parent of the per-run folders (default: the system's temp folder).

    """

    def __init__(self, run_key: str, cores: int | None = None, root: Path | None = None):
        self.cores = max(1, cores or machine_cores())
        self.folder = (root or Path(tempfile.gettempdir())) / "fedgan-cores" / run_key
        self.me = self.folder / str(os.getpid())
        self._checked = 0.0
        self._threads = 1

    def __enter__(self) -> CoreShare:
        """Register this process as an active client."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.me.touch()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Unregister, so the others take the freed cores."""
        self.me.unlink(missing_ok=True)

    def threads(self) -> int:
        """Return this client's share of the cores now (re-read at most every 0.25 s)."""
        now = time.monotonic()
        if now - self._checked >= MIN_INTERVAL_S:
            self._checked = now
            self._threads = self._share(self._active())
        return self._threads

    def _active(self) -> list[int]:
        """PIDs of the live clients registered in the folder, sorted."""
        pids = []
        for entry in self.folder.iterdir():
            if entry.name.isdigit() and _alive(int(entry.name)):
                pids.append(int(entry.name))
        return sorted(pids) or [os.getpid()]

    def _share(self, active: list[int]) -> int:
        """Cores // active, the remainder going to the lowest PIDs."""
        base, extra = divmod(self.cores, len(active))
        rank = active.index(os.getpid()) if os.getpid() in active else len(active)
        return max(1, base + (1 if rank < extra else 0))


def _alive(pid: int) -> bool:
    """Whether a process with this id exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
