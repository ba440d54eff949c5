"""Drive the real `flwr` CLI against a private local SuperLink, and stop it after.

For tests and benchmarks (not part of the app): a private FLWR_HOME and free
ports, so nothing here ever talks to a SuperLink the user started, and
`LocalFlower.stop` ends the SuperLink it started (and whatever of its process
tree is left) by PID. Ports, Flower's environment and the stop come from
`deploy.processes`, which the deployment launcher uses too.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from deploy.processes import (
    flower_env,
    free_port,
    local_superlink_env,
    start_local_superlink,
    stop_tree,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
FLWR = str(Path(sys.executable).parent / "flwr")


class LocalFlower:
    """A private FLWR_HOME and ports, so tests never touch the user's SuperLink."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.control_port = free_port()
        # Quiet, offline, the venv's `flwr` first on PATH (PATH may lack it).
        self.env = flower_env(Path(FLWR).parent)
        self.env.update(local_superlink_env(home, free_port(), self.control_port))
        self.started = False

    def flwr(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run a `flwr` command from the repo root (the SuperLink's working dir).

        The first call starts the SuperLink itself, with time to spare: the CLI
        would give it 15 s, which a loaded machine can exceed.
        """
        if not self.started:
            start_local_superlink(self.env, cwd=REPO_ROOT)
            self.started = True
        return subprocess.run([FLWR, *args], cwd=REPO_ROOT, env=self.env, text=True,
                              capture_output=True, timeout=timeout)

    def run_app(self, run_config: str, nodes: int, stream: bool = True,
                timeout: float = 600, cpus_per_client: int = 1) -> tuple[int, str]:
        """`flwr run .` with a run config; returns (run id, combined output).

        Ray runs (2 cores / `cpus_per_client`) clients at a time; 2 puts every
        node of the run in one Ray actor (one torch import instead of two).
        """
        args = ["run", ".", "--run-config", run_config, "--federation-config",
                f"num-supernodes={nodes} client-resources-num-cpus={cpus_per_client}"]
        if stream:
            args.append("--stream")
        proc = self.flwr(*args, timeout=timeout)
        output = proc.stdout + proc.stderr
        match = re.search(r"started run (\d+)", output)
        assert proc.returncode == 0 and match, output[-3000:]
        return int(match.group(1)), output

    def status(self, run_id: int) -> str:
        """The run's status from `flwr ls`, e.g. 'finished:completed'."""
        proc = self.flwr("ls", "--run-id", str(run_id), "--format", "json", timeout=60)
        return json.loads(proc.stdout)["runs"][0]["status"]

    def wait_finished(self, run_id: int, timeout: float = 600) -> str:
        """Poll until the run has finished; return its status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(2)
        raise TimeoutError(f"run {run_id} still {status} after {timeout}s")

    def superlink_pids(self) -> list[int]:
        """PIDs of the flower-superlink serving our control port."""
        proc = subprocess.run(
            ["pgrep", "-f", f"flower-superlink.*127.0.0.1:{self.control_port}( |$)"],
            capture_output=True, text=True)
        return [int(p) for p in proc.stdout.split()]

    def stop(self) -> None:
        """SIGTERM our SuperLink, then SIGKILL whatever of its tree is left.

        A simulation process can outlive its SuperLink (it is re-parented to
        init), e.g. after a failed test; only PIDs from our own tree are killed.
        """
        stop_tree(self.superlink_pids(), grace=15)
