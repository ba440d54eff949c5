"""Drive the real `flwr` CLI against a private local SuperLink, and stop it after.

For tests and benchmarks: a private FLWR_HOME and free ports, so nothing here
ever talks to a SuperLink the user started, and `LocalFlower.stop` ends the
SuperLink it started (and whatever of its process tree is left) by PID.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
FLWR = str(Path(sys.executable).parent / "flwr")


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalFlower:
    """A private FLWR_HOME and ports, so tests never touch the user's SuperLink."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.control_port = free_port()
        self.env = dict(os.environ)
        self.env.update(
            FLWR_HOME=str(home),
            FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
            FLWR_LOCAL_CONTROL_API_PORT=str(self.control_port),
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            FLWR_DISABLE_UPDATE_CHECK="1",
            FLWR_TELEMETRY_ENABLED="0",
            RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
            WANDB_SILENT="true",
        )
        # The CLI's `flwr` entry point must be the venv's (PATH may lack it).
        self.env["PATH"] = f"{Path(sys.executable).parent}:{self.env.get('PATH', '')}"

    def flwr(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run a `flwr` command from the repo root (the SuperLink's working dir)."""
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
        links = self.superlink_pids()
        table = process_table()
        tree = [pid for link in links for pid in descendants(link, table)]
        for pid in links:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while any(alive(p) for p in links + tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in links + tree:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def process_table() -> dict[int, tuple[int, str]]:
    """Map each process id to (parent id, command line)."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True,
                         text=True, check=True).stdout
    table = {}
    for line in out.splitlines():
        pid, ppid, *args = line.split(maxsplit=2)
        table[int(pid)] = (int(ppid), args[0] if args else "")
    return table


def descendants(root: int, table: dict[int, tuple[int, str]]) -> list[int]:
    """PIDs below `root` in the process tree."""
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in table.items() if ppid == parent]
        found += children
        frontier += children
    return found


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
