"""CoreShare: clients training at the same time split the cores; none stays idle."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args
from flwr.supercore.utils import simulation_config_from_json

from fedgan_app.cores import CoreShare, federation_config, simulation_resources

# A second client: registers in the same folder, says so, and trains (sleeps).
OTHER_CLIENT = """
import sys, time
from pathlib import Path
from fedgan_app.cores import CoreShare
with CoreShare("run-1", cores=4, root=Path(sys.argv[1])) as share:
    print("registered", flush=True)
    time.sleep(60)
"""


def _start_other(root: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", OTHER_CLIENT, str(root)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "registered"
    return proc


def _fresh(share: CoreShare) -> int:
    share._checked = 0.0  # skip the 0.25 s read interval in tests
    return share.threads()


def test_a_lone_client_takes_every_core(tmp_path: Path) -> None:
    with CoreShare("run-1", cores=4, root=tmp_path) as share:
        assert _fresh(share) == 4


def test_two_clients_split_the_cores_and_the_survivor_takes_them_back(tmp_path: Path) -> None:
    # Prepare: another client of the same run is training
    other = _start_other(tmp_path)
    try:
        with CoreShare("run-1", cores=4, root=tmp_path) as share:
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
        with CoreShare("run-1", cores=3, root=tmp_path) as share:
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
        with CoreShare("run-1", cores=3, root=tmp_path) as share:
            # Execute
            mine = _fresh(share)
        # Assert: 2 + 1 = 3 cores, the extra one to the lower process id
        assert mine == (2 if os.getpid() < other.pid else 1)
    finally:
        other.kill()
        other.wait()


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
        assert int(1 / gpu) >= at_once or gpu == 1.0
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
    for config in (text, with_gpu):
        parsed = simulation_config_from_json(
            {k.replace("-", "_"): v for k, v in parse_config_args([config]).items()})
        assert parsed.num_supernodes in (5, 20)
