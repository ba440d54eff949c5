"""Process control shared by deploy/ and the test harness: environment, stop by PID."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from deploy import processes
from deploy.processes import (
    FLOWER_SETTINGS,
    ProcessGroup,
    alive,
    flower_env,
    shell_exports,
    stop_tree,
    wait_gone,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_flower_env_drops_internal_grpc_switches_and_puts_bin_first(tmp_path: Path) -> None:
    # Prepare: an environment that would open Flower's legacy gRPC servers
    setting = next(iter(FLOWER_SETTINGS))
    base = {"PATH": "/usr/bin", "FLWR_INTERNAL_GRPC_CONTROL": "0.0.0.0:9093",
            setting: "something else", "KEEP": "me"}

    # Execute
    env = flower_env(tmp_path, base)

    # Assert: our settings win, the switch is gone, the rest is kept
    assert {k: env[k] for k in FLOWER_SETTINGS} == FLOWER_SETTINGS
    assert not any(k.startswith("FLWR_INTERNAL_GRPC_") for k in env)
    assert env["PATH"].split(":") == [str(tmp_path), "/usr/bin"]
    assert env["KEEP"] == "me"


def test_shell_exports_keep_a_home_and_ports_already_set(tmp_path: Path) -> None:
    # Prepare
    home = tmp_path / "a home"
    script = 'eval "$EXPORTS"; env -0'

    # Execute: the lines as a shell reads them
    exports = shell_exports(home, 1001, 1002, {"FLWR_LOCAL_CONTROL_API_PORT": "2002"})
    out = subprocess.run(["bash", "-c", script], env={"EXPORTS": exports},
                         capture_output=True, text=True, check=True).stdout

    # Assert
    seen = dict(item.split("=", 1) for item in out.split("\0") if item)
    assert seen["FLWR_HOME"] == str(home)
    assert seen["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] == "1001"
    assert seen["FLWR_LOCAL_CONTROL_API_PORT"] == "2002"
    assert {k: seen[k] for k in FLOWER_SETTINGS} == FLOWER_SETTINGS


def test_the_env_command_runs_on_the_standard_library_alone() -> None:
    # Execute: -S: no site-packages, as a system python3 before the venv exists
    proc = subprocess.run([sys.executable, "-S", "-m", "deploy.processes", "env", "--home",
                           "/h", "--http-port", "1", "--control-port", "2"], cwd=REPO_ROOT,
                          env={}, capture_output=True, text=True)

    # Assert
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == shell_exports(Path("/h"), 1, 2, {})


def test_no_other_file_types_the_flower_settings() -> None:
    # Prepare: the Flower and Ray keys (W&B's is also set by a test of its own)
    keys = [k for k in FLOWER_SETTINGS if k.startswith(("FLWR_", "RAY_"))]
    # The files of the repository (git's list: run folders and app bundles that
    # benchmarks leave under ignored folders hold copies of processes.py itself).
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    files = [REPO_ROOT / name for name in listed.stdout.splitlines()
             if name.endswith((".py", ".sh")) or name == ".ci/run"]
    files = [p for p in files if p.is_file()]

    # Execute
    copies = {str(p.relative_to(REPO_ROOT)): key for p in files for key in keys
              if key in p.read_text() and p != Path(processes.__file__)}

    # Assert
    assert copies == {}


def test_stop_tree_kills_a_tree_that_ignores_sigterm() -> None:
    # Prepare: a shell and its child that both ignore SIGTERM
    shell = subprocess.Popen(["bash", "-c", 'trap "" TERM; sleep 300 & echo $!; wait'],
                             stdout=subprocess.PIPE, text=True)
    child = int(shell.stdout.readline())
    try:
        # Execute
        stop_tree([shell.pid], grace=1)

        # Assert: SIGKILL reached both (it is delivered after stop_tree returns)
        assert shell.wait(timeout=30) == -signal.SIGKILL
        assert wait_gone(lambda: [child] if alive(child) else [], timeout=30)
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.wait()
        if alive(child):
            processes.send_signal(child, signal.SIGKILL)


def test_a_child_whose_parent_exited_is_still_stopped(tmp_path: Path) -> None:
    # Prepare: a process of ours starts a child, is seen with it, then exits
    gate = tmp_path / "gate"
    group = ProcessGroup()
    parent = group.spawn(["bash", "-c", f'sleep 300 & echo $!; until [ -e "{gate}" ]; do '
                                        "sleep 0.05; done"], None, {"PATH": "/usr/bin:/bin"})
    orphan = int(parent.stdout.readline())
    try:
        seen_with_parent = group.processes()
        gate.touch()
        parent.wait(timeout=30)

        # Execute
        still_known = group.processes()
        group.stop([])

        # Assert: known by PID (and start time) after its parent left, then stopped
        assert {parent.pid, orphan} <= set(seen_with_parent)
        assert still_known == [orphan]
        assert not alive(orphan)
        assert group.processes() == []
    finally:
        if alive(orphan):
            processes.send_signal(orphan, signal.SIGKILL)
        parent.stdout.close()


_LAUNCHER = """
import json, os, sys
from deploy import processes
adopting = sys.argv[1] == "adopt" and processes.adopt_orphans()
group = processes.ProcessGroup()
child = group.spawn(["bash", "-c", "sleep 300 & echo $!"], None, {"PATH": "/usr/bin:/bin"})
orphan = int(child.stdout.readline())
child.wait(timeout=30)  # gone before the group ever looked: its child is an orphan
found = group.processes()
group.stop([], grace=1)
stopped = not processes.alive(orphan)
processes.reap_orphans()
print(json.dumps({"adopting": adopting, "orphan": orphan, "found": found,
                  "stopped": stopped, "zombie": os.path.exists(f"/proc/{orphan}")}))
"""


@pytest.mark.parametrize("mode", ["adopt", "plain"])
def test_a_launcher_finds_and_reaps_an_orphan_it_never_saw(mode: str) -> None:
    # Prepare: a launcher (its own process) whose child forks a grandchild and
    # exits before the launcher looks at its tree: the race a SuperExec forking
    # a ClientApp as the stop begins makes
    out = subprocess.run([sys.executable, "-c", _LAUNCHER, mode], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    try:
        # Assert: adopted, the orphan is the launcher's child: found, stopped and
        # reaped; without adoption it went to init and the walk misses it
        if mode == "adopt":
            assert result["adopting"] is True
            assert result["found"] == [result["orphan"]]
            assert result["stopped"] and not result["zombie"]
        else:
            assert result["found"] == [] and not result["stopped"]
    finally:
        if alive(result["orphan"]):
            processes.send_signal(result["orphan"], signal.SIGKILL)
