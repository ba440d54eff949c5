"""CoreShare: clients training at the same time split the free cores; none stays idle."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args
from flwr.supercore.utils import simulation_config_from_json

from fedgan_app.federation.cores import (
    BusyMeter,
    CoreShare,
    federation_config,
    machine_cpus,
    simulation_resources,
)

# A second client: registers in the same folder, says so, and trains (sleeps).
OTHER_CLIENT = """
import sys, time
from pathlib import Path
from fedgan_app.federation.cores import CoreShare
with CoreShare("run-1", cores=4, root=Path(sys.argv[1])) as share:
    print("registered", flush=True)
    time.sleep(60)
"""


def _start_other(root: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", OTHER_CLIENT, str(root)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "registered"
    return proc


# A process that burns one core: pinned to the core in argv[1], says when it runs.
HOG = """
import os, sys
os.sched_setaffinity(0, {int(sys.argv[1])})
print("burning", flush=True)
while True:
    pass
"""


def _fresh(share: CoreShare) -> int:
    share._checked = 0.0  # skip the 0.25 s read interval in tests
    return share.threads()


def _no_proc(tmp_path: Path) -> Path:
    """A proc root without /proc's files: the share counts every core as free."""
    return tmp_path / "no-proc"


def _write_proc(proc: Path, elapsed: int, busy: dict[int, int],
                processes: dict[int, int]) -> None:
    """Fake /proc files: every core `elapsed` ticks, `busy[i]` of the i-th's busy."""
    cpus = machine_cpus()
    lines = [f"cpu  {sum(busy.values())} 0 0 {elapsed * len(cpus) - sum(busy.values())} "
             "0 0 0 0 0 0"]
    for i, cpu in enumerate(cpus):
        used = busy.get(i, 0)
        # user nice system idle iowait irq softirq steal guest guest_nice
        lines.append(f"cpu{cpu} {used - used // 4} 0 {used // 4} {elapsed - used} 0 0 0 0 0 0")
    lines.append("intr 12345 0 1 2")
    (proc / "stat").parent.mkdir(parents=True, exist_ok=True)
    (proc / "stat").write_text("\n".join(lines) + "\n")
    for pid, ticks in processes.items():
        (proc / str(pid)).mkdir(exist_ok=True)
        # A name with spaces and a parenthesis; utime and stime are fields 14 and 15.
        (proc / str(pid) / "stat").write_text(
            f"{pid} (ray::Client) x) R 1 1 1 0 -1 0 0 0 0 0 {ticks - ticks // 3} "
            f"{ticks // 3} 0 0 20 0 3 0 100 0 0\n")


needs_two_cores = pytest.mark.skipif(len(machine_cpus()) < 2, reason="needs two cores")


def test_a_lone_client_takes_every_core(tmp_path: Path) -> None:
    with CoreShare("run-1", cores=4, root=tmp_path, proc=_no_proc(tmp_path)) as share:
        assert _fresh(share) == 4


def test_two_clients_split_the_cores_and_the_survivor_takes_them_back(tmp_path: Path) -> None:
    # Prepare: another client of the same run is training
    other = _start_other(tmp_path)
    try:
        with CoreShare("run-1", cores=4, root=tmp_path, proc=_no_proc(tmp_path)) as share:
            # Execute / Assert: two active -> two threads each
            assert _fresh(share) == 2

            # Execute: the other client finishes its round
            other.kill()
            other.wait()
            # Assert: its file is left behind by the kill, but a dead PID does not count
            assert len(list(share.folder.iterdir())) == 2
            assert _fresh(share) == 4
    finally:
        if other.poll() is None:
            other.kill()


def test_other_runs_do_not_count_and_leaving_unregisters(tmp_path: Path) -> None:
    # Prepare: a client of another run
    other = subprocess.Popen(
        [sys.executable, "-c", OTHER_CLIENT.replace("run-1", "run-2"), str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    assert other.stdout is not None and other.stdout.readline().strip() == "registered"
    try:
        # Execute
        with CoreShare("run-1", cores=3, root=tmp_path, proc=_no_proc(tmp_path)) as share:
            threads = _fresh(share)
            me = share.me
        # Assert
        assert threads == 3
        assert not me.exists()
    finally:
        other.kill()
        other.wait()


def test_uneven_split_gives_the_remainder_to_the_lowest_pid(tmp_path: Path) -> None:
    # Prepare: 2 clients on 3 cores
    other = _start_other(tmp_path)
    try:
        with CoreShare("run-1", cores=3, root=tmp_path, proc=_no_proc(tmp_path)) as share:
            # Execute
            mine = _fresh(share)
        # Assert: 2 + 1 = 3 cores, the extra one to the lower process id
        assert mine == (2 if os.getpid() < other.pid else 1)
    finally:
        other.kill()
        other.wait()


@needs_two_cores
@pytest.mark.parametrize(("hog_ticks", "expected"), [(25, 1), (0, 2)])
def test_a_lone_client_leaves_the_core_that_other_work_keeps_busy(
        tmp_path: Path, hog_ticks: int, expected: int) -> None:
    # Prepare: two cores; in 25 ticks the client used one, other work `hog_ticks` of
    # the other
    proc, me = tmp_path / "proc", os.getpid()
    with CoreShare("run-1", cores=2, root=tmp_path, proc=proc) as share:
        _write_proc(proc, 100, {0: 40, 1: 60}, {me: 50})
        first = _fresh(share)
        _write_proc(proc, 125, {0: 40 + hog_ticks, 1: 85}, {me: 75})

        # Execute
        threads = _fresh(share)

    # Assert: the first read has nothing to compare with (every core free); then a
    # core busy with other work is not handed out, and an idle one is
    assert first == 2
    assert share.meter.others == pytest.approx(hog_ticks / 25)
    assert threads == expected


@needs_two_cores
@pytest.mark.parametrize(("cores", "split"), [(2, (1, 1)), (4, (2, 1))])
def test_two_clients_share_the_cores_other_work_leaves_free(
        tmp_path: Path, cores: int, split: tuple[int, int]) -> None:
    # Prepare: another client of the run; in 25 ticks other work kept one core busy
    # and the two clients shared the other
    other = _start_other(tmp_path)
    proc, me = tmp_path / "proc", os.getpid()
    try:
        with CoreShare("run-1", cores=cores, root=tmp_path, proc=proc) as share:
            _write_proc(proc, 100, {0: 10, 1: 10}, {me: 5, other.pid: 5})
            _fresh(share)
            _write_proc(proc, 125, {0: 35, 1: 35}, {me: 17, other.pid: 18})

            # Execute
            mine = _fresh(share)

        # Assert: cores - 1 free cores split between the two, the extra to the lower PID
        assert share.meter.others == pytest.approx(1.0)
        assert mine == (split[0] if me < other.pid else split[1])
    finally:
        other.kill()
        other.wait()


def test_the_meter_keeps_its_figure_while_it_cannot_measure(tmp_path: Path) -> None:
    # Prepare: one core busy with other work in the first interval
    proc, me = tmp_path / "proc", os.getpid()
    meter = BusyMeter(machine_cpus(), proc)
    _write_proc(proc, 100, {}, {me: 0})
    first = meter.others_busy([me])
    _write_proc(proc, 125, {0: 25}, {me: 0})
    measured = meter.others_busy([me])

    # Execute: an interval under 10 ticks; then another process joins; then no /proc
    _write_proc(proc, 130, {}, {me: 0})
    short = meter.others_busy([me])
    _write_proc(proc, 200, {}, {me: 0, 1: 0})
    joined = meter.others_busy([me, 1])
    (proc / "stat").unlink()
    gone = meter.others_busy([me, 1])

    # Assert: 0 before the first interval; then the last figure (1 core) is kept
    assert first == 0.0
    assert measured == short == joined == gone == pytest.approx(1.0)


def test_without_proc_every_core_counts_as_free(tmp_path: Path) -> None:
    # Execute: /proc's files missing (macOS)
    with CoreShare("run-1", cores=2, root=tmp_path, proc=_no_proc(tmp_path)) as share:
        reads = [_fresh(share) for _ in range(3)]

    # Assert: today's share of every core
    assert reads == [2, 2, 2]
    assert share.meter.others == 0.0


@needs_two_cores
@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="needs Linux's /proc")
@pytest.mark.slow
def test_a_real_process_burning_a_core_takes_a_thread_away(tmp_path: Path) -> None:
    # Prepare: wait for a 0.5 s interval in which other work left every core free
    # (other tests may run beside this one; without a free core nothing can be seen)
    cores = len(machine_cpus())
    with CoreShare("run-1", cores=cores, root=tmp_path) as share:
        share.threads()
        idle = _read_until(share, lambda n: n == cores)
        if idle != cores:
            pytest.skip(f"no interval with every core free (other work on "
                        f"{share.meter.others:.1f} cores)")

        # Execute: a process burns one core
        hog = subprocess.Popen([sys.executable, "-c", HOG, str(machine_cpus()[0])],
                               stdout=subprocess.PIPE, text=True)
        try:
            assert hog.stdout is not None and hog.stdout.readline().strip() == "burning"
            share.threads()  # the meter's interval starts with the hog running
            loaded = _read_until(share, lambda n: n < idle)
        finally:
            hog.kill()
            hog.wait()

    # Assert: only the direction (the figures depend on the machine)
    assert loaded < idle, f"other work on {share.meter.others:.2f} cores"


def _read_until(share: CoreShare, done: Callable[[int], bool], tries: int = 10) -> int:
    """Read the share every 0.5 s until `done(threads)` holds or the tries are spent."""
    threads = share.cores
    for _ in range(tries):
        time.sleep(0.5)
        threads = share.threads()
        if done(threads):
            break
    return threads


@pytest.mark.parametrize("cores", [1, 2, 3, 7, 16, 64])
def test_simulation_resources_on_cpus_run_one_client_per_core(cores: int) -> None:
    for clients in range(1, 5 * cores + 2):
        # Execute
        resources = simulation_resources(clients, cores, gpus=0)

        # Assert: Ray runs init-args-num-cpus / num-cpus clients at once (Flower's
        # actor pool): one per core, fewer when the federation is smaller; no GPU share
        assert resources == {"client-resources-num-cpus": 1,
                             "init-args-num-cpus": min(clients, cores)}


@pytest.mark.parametrize("cores", [1, 2, 3, 7, 16, 64])
def test_simulation_resources_with_a_gpu_run_a_rounds_clients_at_once_up_to_four_per_core(
        cores: int) -> None:
    for clients in range(1, 5 * cores + 2):
        # Execute
        resources = simulation_resources(clients, cores, gpus=1)

        # Assert: Ray runs init-args-num-cpus / num-cpus clients at once (Flower's
        # actor pool): all of them up to 4 per core, else one per core; the GPU
        # shared by the clients running at once
        at_once = clients if clients <= 4 * cores else cores
        assert resources["client-resources-num-cpus"] == 1
        assert resources["init-args-num-cpus"] == at_once
        gpu = resources["client-resources-num-gpus"]
        # Ray counts a GPU in 1/10,000ths: `at_once` shares fit on one GPU
        assert at_once * round(gpu * 10_000) <= 10_000
        assert gpu == pytest.approx(min(1.0, 1 / at_once), abs=0.002)


def test_simulation_resources_reject_impossible_machines() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="clients >= 1"):
        simulation_resources(0, 2)
    with pytest.raises(ValueError, match="cores >= 1"):
        simulation_resources(5, 0)


def test_federation_config_is_one_that_flwr_accepts() -> None:
    # Execute
    text = federation_config(5, cores=2, gpus=0)
    with_gpu = federation_config(20, cores=16, gpus=1)

    # Assert: the values Flower's own parser turns into its simulation config
    assert text == "num-supernodes=5 client-resources-num-cpus=1 init-args-num-cpus=2"
    assert with_gpu == ("num-supernodes=20 client-resources-num-cpus=1 "
                        "init-args-num-cpus=20 client-resources-num-gpus=0.05")
    for config, nodes in ((text, 5), (with_gpu, 20)):
        parsed = simulation_config_from_json(
            {k.replace("-", "_"): v for k, v in parse_config_args([config]).items()})
        assert parsed.num_supernodes == nodes
