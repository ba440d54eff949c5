"""fedgan.sh stop: stops the SuperLink on its own control port, and no other."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.flwr_local import REPO_ROOT, LocalFlower, alive

pytestmark = pytest.mark.e2e


def _start_superlink(flower: LocalFlower) -> list[int]:
    """Start a private local SuperLink the way any `flwr` command does."""
    flower.flwr("ls", "--format", "json", timeout=120)
    deadline = time.monotonic() + 30
    while not flower.superlink_pids() and time.monotonic() < deadline:
        time.sleep(0.2)
    return flower.superlink_pids()


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
