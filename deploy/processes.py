"""Process control shared by the deployment launcher, the test harness and fedgan.sh.

The one owner of three things:

* free TCP ports on loopback (`free_port`);
* the environment every Flower process gets (`FLOWER_SETTINGS`, `flower_env`,
  `local_superlink_env`): quiet, offline, no runtime dependency installs;
* starting the `flwr` CLI's local SuperLink with time to spare
  (`start_local_superlink`);
* stopping what we started by PID: the process tree (`process_table`,
  `descendants`), processes remembered by PID and start time so that a reused
  PID is never signalled (`ProcessGroup`), `stop_tree`, and a launcher
  adopting the orphans of its descendants (`adopt_orphans`, `reap_orphans`).

``python -m deploy.processes env --home H --http-port P --control-port P``
prints the settings as shell ``export`` lines, which fedgan.sh evaluates: the
shell never types a second copy of them. Standard library only, so any
``python3`` can run it before the project's venv exists
(``start-local`` needs the venv's Python, which has Flower).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO

# Every Flower process we start gets these (and the tests' and benchmarks' own
# processes, where they are not set already).
FLOWER_SETTINGS = {
    # Flower would install the app's dependencies (torch) into a per-run environment.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # No network probes.
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    # Ray leaves CUDA_VISIBLE_DEVICES alone for a client with no GPU share (its
    # announced default) and stops warning about the change.
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "WANDB_SILENT": "true",
}
# Flower's internal switches that open the legacy gRPC Control and Fleet servers
# on their own (public) addresses: never passed on to a process we start.
INTERNAL_GRPC_PREFIX = "FLWR_INTERNAL_GRPC_"
# Where the `flwr` CLI starts and finds its local SuperLink.
HOME_KEY = "FLWR_HOME"
HTTP_PORT_KEY = "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"
CONTROL_PORT_KEY = "FLWR_LOCAL_CONTROL_API_PORT"
# The `flwr` CLI gives the local SuperLink it starts 15 s to answer; on a loaded
# 2-core machine importing Flower alone can take longer, and the CLI then kills
# it and fails. `start_local_superlink` gives it this long instead.
LOCAL_SUPERLINK_START_S = 120.0
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


# --- ports and environment ------------------------------------------------------------


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flower_env(bin_dir: Path | None = None,
               base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a Flower process: quiet, offline, `bin_dir` first on PATH.

    Parameters
    ----------
    bin_dir : Path | None
        Folder of `flwr`, `flower-superlink`, ... (Flower starts
        `flower-superexec`, `flwr-serverapp`, `flwr-clientapp` by name);
        default: that of the running Python.
    base : Mapping[str, str] | None
        The environment to start from (default: this process's), less
        Flower's internal gRPC switches.

    Returns
    -------
    dict[str, str]
        A new environment holding `FLOWER_SETTINGS`.

    """
    bin_dir = bin_dir or Path(sys.executable).parent
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith(INTERNAL_GRPC_PREFIX)}
    env.update(FLOWER_SETTINGS)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def local_superlink_env(home: Path, http_port: int, control_port: int) -> dict[str, str]:
    """The Flower home and ports of the local SuperLink the `flwr` CLI starts."""
    return {HOME_KEY: str(home), HTTP_PORT_KEY: str(http_port),
            CONTROL_PORT_KEY: str(control_port)}


def start_local_superlink(env: Mapping[str, str], timeout: float = LOCAL_SUPERLINK_START_S,
                          cwd: Path | None = None) -> None:
    """Start the `flwr` CLI's local SuperLink (when none answers) and wait until it does.

    Flower's own launcher starts it (in this Python, which must have Flower),
    so its command line, database and log are the ones `flwr run` and `flwr
    ls` would give it, and they find it by its health endpoint afterwards; only
    the deadline differs. It runs detached, like the one the CLI starts: stop
    it by its control port.

    Parameters
    ----------
    env : Mapping[str, str]
        The environment of the `flwr` commands that will use it (the Flower
        home and ports of `local_superlink_env`, `flower-superlink` on PATH).
    timeout : float
        Seconds to wait for it to answer.
    cwd : Path | None
        Its working directory (where relative output folders land); default:
        this process's.

    Raises
    ------
    RuntimeError
        When it exits or does not answer in time (Flower's message, which
        names its log file).

    """
    code = ("import flwr.cli.local_superlink as local\n"
            f"local.LOCAL_SUPERLINK_STARTUP_TIMEOUT = {float(timeout)!r}\n"
            "if not local._is_local_superlink_started():\n"
            "    local._start_local_superlink()\n")
    proc = subprocess.run([sys.executable, "-c", code], env=dict(env), cwd=cwd,
                          capture_output=True,
                          text=True, timeout=timeout + 60)
    if proc.returncode != 0:
        raise RuntimeError("the local SuperLink did not start: "
                           + (proc.stderr.strip().splitlines() or ["no message"])[-1])


def use_flower_settings() -> None:
    """Give this process (and what it starts) the Flower settings it does not set itself."""
    for key, value in FLOWER_SETTINGS.items():
        os.environ.setdefault(key, value)


def shell_exports(home: Path, http_port: int, control_port: int,
                  environ: Mapping[str, str] | None = None) -> str:
    """`export` lines of the Flower settings; the home and ports from `environ` when set."""
    environ = os.environ if environ is None else environ
    local = local_superlink_env(home, http_port, control_port)
    values = {key: environ.get(key) or value for key, value in local.items()}
    values.update(FLOWER_SETTINGS)
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in values.items())


# --- the process tree --------------------------------------------------------------------


def process_table() -> dict[int, tuple[int, str]]:
    """Map each process id to (parent id, command line); the `ps` that read it left out."""
    with subprocess.Popen(["ps", "-ww", "-eo", "pid=,ppid=,args="], stdout=subprocess.PIPE,
                          text=True) as ps:
        out, _ = ps.communicate()
    if ps.returncode:
        raise subprocess.CalledProcessError(ps.returncode, ps.args)
    table = {}
    for line in out.splitlines():
        pid, ppid, *args = line.split(maxsplit=2)
        table[int(pid)] = (int(ppid), args[0] if args else "")
    table.pop(ps.pid, None)
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


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie counts as gone)."""
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] != "Z"


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot), or None once it is gone."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def send_signal(pid: int, sig: signal.Signals) -> None:
    """Send a signal to one PID; a process already gone is fine."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def wait_gone(pids: Callable[[], Iterable[int]], timeout: float) -> bool:
    """Poll until `pids()` is empty; whether it emptied within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while list(pids()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def stop_tree(roots: Sequence[int], grace: float = 15) -> None:
    """SIGTERM `roots`, then SIGKILL whatever of their trees is left after `grace` s.

    The trees are read before the roots go (a child can outlive its parent,
    re-parented to init); a PID whose start time changed meanwhile belongs to
    another process and is left alone.
    """
    table = process_table()
    pids = list(roots) + [pid for root in roots for pid in descendants(root, table)]
    started = {pid: start_time(pid) for pid in pids}
    for pid in roots:
        send_signal(pid, signal.SIGTERM)
    wait_gone(lambda: [p for p in pids if alive(p)], grace)
    for pid in pids:
        if alive(pid) and start_time(pid) == started[pid]:
            send_signal(pid, signal.SIGKILL)


_adopting = False  # whether this process took its descendants' orphans (adopt_orphans)


def adopt_orphans() -> bool:
    """Make this process the subreaper of its descendants (Linux); whether it took.

    A process whose parent exits is then re-parented to us instead of init,
    so the walk of our own tree still finds it: a ClientApp that a SuperExec
    forks just as the stop begins cannot slip out of it. Only for a launcher
    whose children are all its own: it must call `reap_orphans` at the end.
    """
    global _adopting
    if _LIBC is not None and _LIBC.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0:
        _adopting = True
    return _adopting


def reap_orphans() -> None:
    """Collect every child of ours that has ended, adopted orphans included (no zombies).

    Call it once the `Popen` objects have waited for their own processes.
    """
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def die_with_parent() -> None:
    """In a child before exec: get SIGTERM when its parent dies (Linux only)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ProcessGroup:
    """Processes we started and every descendant of theirs seen, known by PID and start time.

    A descendant is remembered with its start time when first seen, so a child
    whose parent exits first is still known by PID, and a PID taken over by
    another process is never ours.
    """

    def __init__(self) -> None:
        self.children: list[subprocess.Popen] = []
        self._seen: dict[int, int] = {}  # PID -> start time of every process of ours seen

    def spawn(self, command: list[str], log: Path | None, env: dict[str, str],
              cwd: Path | None = None) -> subprocess.Popen:
        """Start a process of ours in its own session, stopped if we die.

        Its output goes to `log`, or to a text pipe when `log` is None.
        """
        stdout: IO | int = open(log, "ab") if log else subprocess.PIPE  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                command, cwd=cwd, env=env, stdout=stdout, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, text=log is None,
                # Own session: a Ctrl-C reaches our process only, which stops the
                # rest in order; the parent-death signal covers us killed hard.
                start_new_session=True, preexec_fn=die_with_parent,
            )
        finally:
            if log:
                stdout.close()  # the child holds its own copy
        self.children.append(proc)
        return proc

    def forget(self, proc: subprocess.Popen) -> None:
        """Drop a child that has ended (a short CLI call) from the ones we stop."""
        self.children.remove(proc)

    def processes(self) -> list[int]:
        """PIDs of the live processes of the group: its children and their descendants.

        Walks the tree from the live children and from every process seen
        before, and remembers what it finds.
        """
        table = process_table()
        roots = {p.pid for p in self.children if p.returncode is None} | set(self.live_seen())
        if _adopting:  # orphans of our descendants are our children now
            roots |= {pid for pid, (ppid, _) in table.items() if ppid == os.getpid()}
        for root in roots:
            for pid in (root, *descendants(root, table)):
                if pid not in self._seen and (start := start_time(pid)) is not None:
                    self._seen[pid] = start
        return self.live_seen()

    def live_seen(self) -> list[int]:
        """The remembered processes that still run (same PID, same start time)."""
        return [pid for pid, start in self._seen.items()
                if start_time(pid) == start and alive(pid)]

    def stop(self, order: Sequence[Sequence[subprocess.Popen]], grace: float = 15) -> None:
        """SIGTERM the children group by group, then every descendant; SIGKILL what is left.

        Children in none of the groups of `order` go first, then each group,
        each given `grace` seconds to exit; descendants outlive their parent
        for a while (a SuperExec polls its parent's PID), so they are asked
        next, then forced.
        """
        ordered = [p for group in order for p in group]
        for group in ([p for p in self.children if p not in ordered], *order):
            self.processes()  # the tree below this group, before its parents go
            for proc in group:
                if proc.poll() is None:
                    send_signal(proc.pid, signal.SIGTERM)
            wait_gone(lambda g=group: [p.pid for p in g if p.poll() is None], grace)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.processes():
                send_signal(pid, sig)
            if wait_gone(self.live_seen, 5.0):
                break
        # A process forked while its parent was being stopped shows up only now.
        for _ in range(3):
            late = self.processes()
            if not late:
                break
            for pid in late:
                send_signal(pid, signal.SIGKILL)
            wait_gone(self.live_seen, 5.0)
        for proc in self.children:
            if proc.poll() is None:
                send_signal(proc.pid, signal.SIGKILL)
            proc.wait()


# --- command line --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """`env`: print the Flower settings as `export` lines; `start-local`: start the SuperLink."""
    parser = argparse.ArgumentParser(prog="python -m deploy.processes",
                                     description="Flower's environment for fedgan.sh.")
    commands = parser.add_subparsers(dest="command", required=True)
    env = commands.add_parser("env", help="export lines: the Flower home and ports of the "
                                          "local SuperLink (kept when already set) and "
                                          "the quiet, offline settings")
    env.add_argument("--home", type=Path, required=True)
    env.add_argument("--http-port", type=int, required=True)
    env.add_argument("--control-port", type=int, required=True)
    start = commands.add_parser("start-local", help="start the local SuperLink of the "
                                                    "Flower home and ports in the environment "
                                                    "(when none answers), waiting up to "
                                                    "--timeout seconds")
    start.add_argument("--timeout", type=float, default=LOCAL_SUPERLINK_START_S)
    args = parser.parse_args(argv)
    if args.command == "start-local":
        try:
            start_local_superlink(os.environ, args.timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"fedgan: {exc}", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(shell_exports(args.home, args.http_port, args.control_port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
