"""fedgan.sh: Flower's settings from deploy/processes.py; stop ends its own SuperLink only."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.processes import FLOWER_SETTINGS, alive, free_port, start_local_superlink
from harness.local_superlink import REPO_ROOT, LocalFlower

pytestmark = pytest.mark.e2e


def _start_superlink(flower: LocalFlower) -> list[int]:
    """Start a private local SuperLink the way any `flwr` command does."""
    flower.flwr("ls", "--format", "json", timeout=120)
    deadline = time.monotonic() + 30
    while not flower.superlink_pids() and time.monotonic() < deadline:
        time.sleep(0.2)
    return flower.superlink_pids()


@pytest.mark.slow
def test_stop_ends_only_the_superlink_on_its_control_port(tmp_path: Path) -> None:
    # Prepare: two private SuperLinks; fedgan.sh's environment names the first
    ours, other = LocalFlower(tmp_path / "ours"), LocalFlower(tmp_path / "other")
    try:
        our_pids, other_pids = _start_superlink(ours), _start_superlink(other)
        assert our_pids and other_pids

        # Execute
        stop = subprocess.run([str(REPO_ROOT / "fedgan.sh"), "stop"], env=ours.env,
                              capture_output=True, text=True, timeout=60)
        again = subprocess.run([str(REPO_ROOT / "fedgan.sh"), "stop"], env=ours.env,
                               capture_output=True, text=True, timeout=60)

        # Assert: ours is gone, the other one still serves; a second stop says so
        assert stop.returncode == 0, stop.stderr
        assert f"stopping local SuperLink (pid {our_pids[0]})" in stop.stderr
        assert not any(alive(pid) for pid in our_pids)
        assert all(alive(pid) for pid in other_pids)
        assert again.returncode == 0
        assert f"no local SuperLink on control port {ours.control_port}" in again.stderr
    finally:
        ours.stop()
        other.stop()


@pytest.mark.slow
def test_start_local_gives_a_slow_superlink_its_own_deadline_and_starts_one(
        tmp_path: Path) -> None:
    # Prepare: a flower-superlink that answers only after 3 s (a loaded machine)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    slow = bin_dir / "flower-superlink"
    real = Path(sys.executable).parent / "flower-superlink"
    slow.write_text(f'#!/bin/sh\nsleep 3\nexec "{real}" "$@"\n')
    slow.chmod(0o755)
    flower = LocalFlower(tmp_path / "home")
    flower.env["PATH"] = f"{bin_dir}{os.pathsep}{flower.env['PATH']}"
    try:
        # Execute: a 1 s deadline fails; the command fedgan.sh runs (default
        # deadline) starts it; a second start finds it answering
        with pytest.raises(RuntimeError, match=r"did not start: .*within 1s"):
            start_local_superlink(flower.env, timeout=1)
        after_failure = flower.superlink_pids()
        start = subprocess.run([sys.executable, "-m", "deploy.processes", "start-local"],
                               env=flower.env, cwd=REPO_ROOT, capture_output=True,
                               text=True, timeout=300)
        started = flower.superlink_pids()
        start_local_superlink(flower.env)
        listed = flower.flwr("ls", "--format", "json", timeout=60)

        # Assert: one SuperLink, the one the CLI then uses (it starts none of its own)
        assert after_failure == []
        assert start.returncode == 0, start.stderr
        assert len(started) == 1
        assert flower.superlink_pids() == started
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert "Starting local SuperLink" not in listed.stdout
    finally:
        flower.stop()
    assert flower.superlink_pids() == []


def test_flower_settings_come_from_deploy_processes(tmp_path: Path) -> None:
    # Prepare: a pgrep that records the environment fedgan.sh gives it (and finds
    # no SuperLink); a control port of our own, which fedgan.sh must keep
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "pgrep"
    fake.write_text(f'#!/bin/sh\nenv -0 > "{tmp_path}/env"\n')
    fake.chmod(0o755)
    port = str(free_port())
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FLWR_LOCAL_CONTROL_API_PORT": port}

    # Execute
    stop = subprocess.run([str(REPO_ROOT / "fedgan.sh"), "stop"], env=env,
                          capture_output=True, text=True, timeout=60)

    # Assert: every setting as deploy.processes has it; the home is this folder's
    seen = dict(item.split("=", 1) for item in
                (tmp_path / "env").read_text().split("\0") if item)
    assert stop.returncode == 0, stop.stderr
    assert {k: seen.get(k) for k in FLOWER_SETTINGS} == FLOWER_SETTINGS
    assert seen["FLWR_LOCAL_CONTROL_API_PORT"] == port
    assert seen["FLWR_HOME"] == str(REPO_ROOT / ".flwr")
    assert f"no local SuperLink on control port {port}" in stop.stderr


@pytest.mark.parametrize("gpus,clients", [(0, 5), (1, 5), (1, 1), (2, 5)])
def test_federation_config_uses_every_core_and_shares_gpus(
        tmp_path: Path, gpus: int, clients: int) -> None:
    # Prepare: an nvidia-smi on PATH that lists `gpus` GPUs (none: no GPU machine)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if gpus:
        listing = "\\n".join(f"GPU {i}: NVIDIA H100 (UUID: GPU-{i})" for i in range(gpus))
        fake = bin_dir / "nvidia-smi"
        fake.write_text(f"#!/bin/sh\nprintf '{listing}\\n'\n")
        fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FEDGAN_CLIENTS": str(clients)}

    # Execute
    out = subprocess.run([str(REPO_ROOT / "fedgan.sh"), "federation"], env=env,
                         capture_output=True, text=True, timeout=30, check=True).stdout

    # Assert: on CPUs one client per core at a time; with GPUs every client of the
    # round at once (5 <= 4 per core), one logical Ray CPU each, sharing the GPUs
    settings = dict(item.split("=") for item in out.split())
    cores = len(os.sched_getaffinity(0))
    assert settings["num-supernodes"] == str(clients)
    assert settings["client-resources-num-cpus"] == "1"
    at_once = clients if gpus else min(clients, cores)
    assert settings["init-args-num-cpus"] == str(at_once)
    if gpus:
        assert float(settings["client-resources-num-gpus"]) == pytest.approx(
            min(1.0, gpus / clients), abs=0.002)
    else:
        assert "client-resources-num-gpus" not in settings
