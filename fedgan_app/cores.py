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

import argparse
import math
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

# Read the folder at most this often (seconds): counting is a directory listing.
MIN_INTERVAL_S = 0.25
# With GPUs, up to this many clients per core run at once; beyond it, one per core
# (each running client is a process holding torch).
MAX_CLIENTS_PER_CORE = 4


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


def simulation_resources(clients: int, cores: int, gpus: int = 0) -> dict[str, float]:
    """Ray resources so that the clients of a round leave no core idle.

    On CPUs, one client per core at a time, in waves (5 clients on 2 cores: 2,
    2 and 1), each with one torch thread; `CoreShare` gives the clients of a
    short last wave the cores the others left, so the one client of the last
    wave trains with both threads. Measured against every client of the round
    at once, sharing the cores by threads (benchmarks/results/throughput.md):
    on an Intel Xeon 2-core machine 7.5 s a round against 8.6 s and 4 s less
    start-up (two processes import torch, not five); on an AMD EPYC 2-core
    machine within 3% of each other.

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
