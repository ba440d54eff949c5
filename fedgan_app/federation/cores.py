"""Share a machine's cores among the clients that train on it at the same moment.

In a simulation, several ClientApps run side by side on one machine, each in
its own process with a fixed torch thread count. When the clients of a round
do not fill the last wave (5 clients on 2 one-CPU slots: waves of 2, 2 and
1), a fixed count leaves cores idle. A `CoreShare` instead registers the
client in a small folder shared by the run's clients on this machine, and
while it trains it asks every few steps how many of them are active, taking
its share of the cores: two active clients on two cores get one thread each,
the one client left in the last wave gets both.

The cores it shares are those that other work leaves free: on Linux a
`BusyMeter` reads how much CPU time the machine spent in the last interval
beyond the run's own active clients (/proc), and the cores that other work
kept busy are not handed out. A torch client with more threads than free
cores waits at every parallel region for the thread that lost its core (the
step's ops are small, so those waits dominate); one thread fewer is far
cheaper. Without /proc (macOS) every core counts as free.

Only this module touches the folder (one empty file per active client,
named by its process id); crashed clients' files are ignored because their
process is gone.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

# Read the folder and /proc at most this often (seconds): a directory listing and
# two or three small files, and an interval long enough for the meter to see.
MIN_INTERVAL_S = 0.25
# The shortest interval the meter turns into a figure: 10 ticks of each core (0.1 s
# at Linux's USER_HZ of 100); a shorter one grows until it is that long.
MIN_WINDOW_TICKS = 10
PROC = Path("/proc")
# With GPUs, up to this many clients per core run at once; beyond it, one per core
# (each running client is a process holding torch).
MAX_CLIENTS_PER_CORE = 4


def machine_cpus() -> list[int]:
    """Ids of the cores this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return list(range(os.cpu_count() or 1))


def machine_cores() -> int:
    """Cores this process may run on."""
    return len(machine_cpus())


class BusyMeter:
    """Cores kept busy by work other than some processes, from /proc (Linux).

    Each read compares the busy time of `cpus` (/proc/stat) with the CPU time
    of the given processes (/proc/<pid>/stat, all their threads) since the
    previous read; the difference is other work, in cores. Both files count
    in the same clock ticks, so the interval needs no clock of its own.

    /proc/stat is used rather than the load average: the averages follow a
    change over a minute or more while a client trains for seconds, and the
    runnable count of /proc/loadavg is one instant that counts this run's own
    threads (which it cannot tell apart) and misses threads asleep at a
    barrier; sampled during training it did not separate a busy core from an
    idle one.

    A read is two or three small /proc files, never a wait. The
    last figure is kept while it cannot be measured: at the first read,
    while the interval is under MIN_WINDOW_TICKS, and when the processes
    changed since the previous read (one that started or ended in the
    interval has CPU time that cannot be split). Without /proc it stays 0.

    Parameters
    ----------
    cpus : Iterable[int]
        Ids of the cores to watch (this process's affinity).
    proc : Path
        Root of the proc file system (a folder of fake files in tests).

    """

    def __init__(self, cpus: Iterable[int], proc: Path = PROC):
        self.cpus = {f"cpu{c}".encode() for c in cpus}
        self.proc = proc
        self.others = 0.0
        self._last: tuple[int, int, dict[int, int]] | None = None

    def others_busy(self, pids: Iterable[int]) -> float:
        """Cores that other work kept busy in the last interval (0 until measured)."""
        now = self._sample(pids)
        if now is None:
            return self.others
        last = self._last
        if last is None or last[2].keys() != now[2].keys():
            self._last = now
            return self.others
        ticks_per_core = (now[1] - last[1]) / max(1, len(self.cpus))
        if ticks_per_core < MIN_WINDOW_TICKS:
            return self.others
        own = sum(now[2][pid] - last[2][pid] for pid in now[2])
        busy = (now[0] - last[0] - own) / ticks_per_core
        self.others = min(float(len(self.cpus)), max(0.0, busy))
        self._last = now
        return self.others

    def _sample(self, pids: Iterable[int]) -> tuple[int, int, dict[int, int]] | None:
        """(busy ticks, all ticks) of the cores and CPU ticks per process; None if unknown."""
        try:
            busy = total = 0
            for line in (self.proc / "stat").read_bytes().splitlines():
                fields = line.split()
                if fields and fields[0] in self.cpus:
                    # user nice system idle iowait irq softirq steal (guest is in user)
                    ticks = [int(f) for f in fields[1:9]]
                    total += sum(ticks)
                    busy += sum(ticks) - ticks[3] - ticks[4]
            own = {pid: self._cpu_ticks(pid) for pid in pids}
        except (OSError, ValueError, IndexError):
            return None
        return busy, total, own

    def _cpu_ticks(self, pid: int) -> int:
        """User + system ticks of a process, all its threads."""
        text = (self.proc / str(pid) / "stat").read_bytes()
        fields = text[text.rindex(b")") + 2:].split()  # the name may hold spaces
        return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


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
    proc : Path
        Root of the proc file system, read for the cores that other work keeps
        busy (a folder without /proc's files: every core counts as free).

    """

    def __init__(self, run_key: str, cores: int | None = None, root: Path | None = None,
                 proc: Path = PROC):
        self.cores = max(1, cores or machine_cores())
        self.folder = (root or Path(tempfile.gettempdir())) / "fedgan-cores" / run_key
        self.me = self.folder / str(os.getpid())
        self.meter = BusyMeter(machine_cpus(), proc)
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
        """Return this client's share of the free cores now (re-read at most every 0.25 s)."""
        now = time.monotonic()
        if now - self._checked >= MIN_INTERVAL_S:
            self._checked = now
            active = self._active()
            self._threads = self._share(active, self.free_cores(active))
        return self._threads

    def free_cores(self, active: list[int]) -> int:
        """Cores less those other work kept busy (at least 1).

        Other work on half a core or more takes the core: a thread that shares
        one with it stalls every parallel region of its client.
        """
        return max(1, self.cores - int(self.meter.others_busy(active) + 0.5))

    def _active(self) -> list[int]:
        """PIDs of the live clients registered in the folder, sorted."""
        pids = []
        for entry in self.folder.iterdir():
            if entry.name.isdigit() and _alive(int(entry.name)):
                pids.append(int(entry.name))
        return sorted(pids) or [os.getpid()]

    def _share(self, active: list[int], cores: int) -> int:
        """Cores // active, the remainder going to the lowest PIDs."""
        base, extra = divmod(cores, len(active))
        rank = active.index(os.getpid()) if os.getpid() in active else len(active)
        return max(1, base + (1 if rank < extra else 0))


def simulation_resources(clients: int, cores: int, gpus: int = 0) -> dict[str, float]:
    """Ray resources so that the clients of a round leave no core idle.

    On CPUs, one client per core at a time, in waves (5 clients on 2 cores: 2,
    2 and 1), each with one torch thread; `CoreShare` gives the clients of a
    short last wave the cores the others left, so the one client of the last
    wave trains with both threads. Fewer processes than clients also means
    fewer torch imports at start-up. benchmarks/results/throughput.md compares
    this layout with the others ("Client layouts").

    With GPUs, up to MAX_CLIENTS_PER_CORE clients per core run at once and
    share the GPUs (kernels of several processes overlap on a GPU): Ray is told
    the machine has one logical CPU per client (`init-args-num-cpus`, as Flower
    1.41 takes only whole CPUs per client); larger federations run one client
    per core.

    Parameters
    ----------
    clients : int
        Clients (SuperNodes) in the federation.
    cores : int
        CPU cores of the machine.
    gpus : int
        GPUs of the machine (0: none).

    Returns
    -------
    dict[str, float]
        `client-resources-num-cpus` (1), `init-args-num-cpus` (the clients
        that run at once) and, with GPUs, `client-resources-num-gpus` (the
        clients running at once share them).

    """
    if clients < 1 or cores < 1 or gpus < 0:
        raise ValueError(f"need clients >= 1, cores >= 1, gpus >= 0; got {clients}, "
                         f"{cores}, {gpus}")
    if gpus:
        at_once = clients if clients <= MAX_CLIENTS_PER_CORE * cores else cores
    else:
        at_once = min(clients, cores)
    resources: dict[str, float] = {"client-resources-num-cpus": 1,
                                   "init-args-num-cpus": at_once}
    if gpus:
        # Rounded down to 1/1000, so that Ray fits `at_once` clients on the GPUs.
        share = math.floor(gpus * 1000 / at_once) / 1000
        while share > 0.001 and int(gpus / share) < at_once:
            share = round(share - 0.001, 3)
        resources["client-resources-num-gpus"] = min(1.0, max(0.001, share))
    return resources


def federation_config(clients: int, cores: int | None = None, gpus: int | None = None) -> str:
    """The `--federation-config` of a local simulation with `clients` SuperNodes."""
    cores = cores or machine_cores()
    gpus = visible_gpus() if gpus is None else gpus
    resources = simulation_resources(clients, cores, gpus)
    return " ".join([f"num-supernodes={clients}",
                     *(f"{key}={value:g}" for key, value in resources.items())])


def visible_gpus() -> int:
    """NVIDIA GPUs that `nvidia-smi -L` lists (0 without the tool or a driver)."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return 0
    try:
        listing = subprocess.run([tool, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in listing.stdout.splitlines())


def _alive(pid: int) -> bool:
    """Whether a process with this id exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Print the local simulation's "
                                     "--federation-config for this machine.")
    parser.add_argument("clients", type=int, help="number of SuperNodes")
    print(federation_config(parser.parse_args().clients))
