"""Run fedgan on Flower's Deployment Engine on this machine: TLS, SuperNode auth, N nodes.

``python -m deploy.launch [N] [--run-config "k=v ..."]`` (what ``./fedgan.sh deploy``
runs) does what an operator does across machines, with every party on loopback:

1. writes a CA, the SuperLink's certificate and one key pair per SuperNode
   (``deploy/credentials.py``) into the work folder (default ``.deploy/``);
2. starts ``flower-superlink`` with TLS, ``--enable-supernode-auth`` and the
   runtime dependency installer off, on a free loopback port;
3. registers each SuperNode's public key (``flwr supernode register``);
4. starts N ``flower-supernode`` processes, node i with
   ``--node-config "partition-id=i num-partitions=N"`` and its own port, and
   waits until the SuperLink lists them all online;
5. runs the app: ``flwr run . <connection> --stream``, then reads the run's
   final status with ``flwr ls`` (``flwr run --stream`` exits 0 even when the
   ServerApp failed);
6. stops every process it started, by PID, also on Ctrl-C, SIGTERM or an
   error: each process (and everything it spawns, e.g. the ServerApp and
   ClientApp subprocesses) carries a marker in its environment, and the launcher
   stops exactly the processes with its marker (``FEDGAN_DEPLOYMENT_ID``: a
   fresh id, or the one already in the launcher's environment, which is how a
   caller can find every process of a deployment).

Each party keeps its own Flower home and log in the work folder:
``flwr-home/`` (the SuperLink's state and the CLI's ``config.toml``),
``superlink.log``, ``supernode-<i>/`` and ``supernode-<i>.log``, ``run.log``.
The exit status is 0 only when the run finished as ``finished:completed``.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from deploy.credentials import Credentials, generate_credentials

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = REPO_ROOT / ".deploy"
CONNECTION = "fedgan-deploy"
MARKER_ENV = "FEDGAN_DEPLOYMENT_ID"  # every process we start carries it
WORKDIR_STAMP = ".fedgan-deploy"  # marks (and locks) a work folder of ours
COMPLETED = "finished:completed"
ACTIVATED_LOG_LINE = "SuperNode ID:"  # a SuperNode logs it once the SuperLink let it in
_PR_SET_PDEATHSIG = 1


class DeploymentError(RuntimeError):
    """A part of the deployment did not start or did not answer in time."""


@dataclass
class SuperNode:
    """One `flower-supernode` process we started."""

    index: int
    process: subprocess.Popen
    log: Path
    port: int

    @property
    def pid(self) -> int:
        """The SuperNode's process id."""
        return self.process.pid


@dataclass
class RunResult:
    """Outcome of `flwr run`: the run id, its final status and the streamed output."""

    run_id: int | None
    status: str
    output: str = field(repr=False)

    @property
    def completed(self) -> bool:
        """Whether the run finished as 'finished:completed'."""
        return self.status == COMPLETED


class Deployment:
    """A SuperLink and SuperNodes on loopback, with TLS and SuperNode authentication.

    Use it as a context manager: leaving the block stops every process it
    started (and their children), whatever happened inside.

    Parameters
    ----------
    workdir : Path
        Folder for the Flower homes and logs of every party.
    credentials : Credentials
        CA, SuperLink certificate and SuperNode keys (see `deploy.credentials`).
    app_dir : Path
        The Flower app to run (this repository). The SuperLink, and so the
        ServerApp, run from it: relative 'output-dir' paths are taken from it.
    bin_dir : Path
        Folder holding `flower-superlink`, `flower-supernode` and `flwr`
        (default: that of the running Python).
    echo : Callable[[str], None] | None
        Where progress lines and the streamed run output go (None: nowhere).

    """

    def __init__(self, workdir: Path, credentials: Credentials, app_dir: Path = REPO_ROOT,
                 bin_dir: Path | None = None,
                 echo: Callable[[str], None] | None = None) -> None:
        self.workdir = workdir.resolve()
        # Absolute: each party runs in its own folder.
        self.credentials = Credentials(credentials.folder.resolve(), credentials.num_nodes)
        self.app_dir = app_dir.resolve()
        self.bin_dir = bin_dir or Path(sys.executable).parent
        self.echo = echo or (lambda _line: None)
        self.home = self.workdir / "flwr-home"
        self.marker = os.environ.get(MARKER_ENV) or uuid.uuid4().hex
        self.env = _flower_env(self.bin_dir, self.marker)
        self.env["FLWR_HOME"] = str(self.home)
        self.superlink: subprocess.Popen | None = None
        self.superlink_port: int | None = None
        self.supernodes: list[SuperNode] = []
        self._children: list[subprocess.Popen] = []

    # --- context manager ---------------------------------------------------------

    def __enter__(self) -> Deployment:
        """Start nothing yet; stop everything on the way out."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop every process of this deployment."""
        self.stop()

    # --- SuperLink ------------------------------------------------------------------

    def start_superlink(self, timeout: float = 60) -> None:
        """Start the SuperLink with TLS and SuperNode auth; return once it accepts TLS."""
        self.superlink_port = free_port()
        self.home.mkdir(parents=True, exist_ok=True)
        creds = self.credentials
        command = [
            self._bin("flower-superlink"),
            "--ssl-ca-certfile", str(creds.ca_cert),
            "--ssl-certfile", str(creds.server_cert),
            "--ssl-keyfile", str(creds.server_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(self.superlink_port),
        ]
        # The ServerApp runs in the SuperLink's folder: start it from the app's.
        self.superlink = self._spawn(command, self.workdir / "superlink.log", self.env,
                                     cwd=self.app_dir)
        self._write_connection()
        self._wait_tls(timeout)
        self.echo(f"SuperLink up on 127.0.0.1:{self.superlink_port} (TLS, node auth; "
                  f"pid {self.superlink.pid})")

    def _write_connection(self) -> None:
        """Name the SuperLink in the CLI's config.toml (address + CA certificate)."""
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f"[superlink.{CONNECTION}]\n"
            f'address = "127.0.0.1:{self.superlink_port}"\n'
            f'root-certificates = "{self.credentials.ca_cert.resolve()}"\n'
        )

    def _wait_tls(self, timeout: float) -> None:
        """Wait until the SuperLink completes a TLS handshake verified by our CA."""
        context = ssl.create_default_context(cafile=str(self.credentials.ca_cert))
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(self.superlink, "SuperLink", self.workdir / "superlink.log")
            try:
                with socket.create_connection(("127.0.0.1", self.superlink_port), 1) as raw:
                    with context.wrap_socket(raw, server_hostname="127.0.0.1"):
                        return
            except ssl.SSLCertVerificationError as exc:
                raise DeploymentError(
                    f"the SuperLink's certificate does not verify against "
                    f"{self.credentials.ca_cert}: {exc.verify_message}") from exc
            except OSError:
                if time.monotonic() > deadline:
                    raise DeploymentError(
                        f"the SuperLink did not accept TLS connections within {timeout:.0f}s"
                        f"; see {self.workdir / 'superlink.log'}") from None
                time.sleep(0.2)

    # --- SuperNodes -----------------------------------------------------------------

    def register(self, public_keys: Sequence[Path]) -> list[int]:
        """Register SuperNode public keys on the SuperLink; return their node ids."""
        # One CLI process per key, side by side (each takes a second or two to start).
        procs = [self._spawn([self._bin("flwr"), "supernode", "register", str(key),
                              CONNECTION, "--format", "json"], None, self.env)
                 for key in public_keys]
        node_ids = []
        for key, proc in zip(public_keys, procs, strict=True):
            out, _ = proc.communicate(timeout=120)
            self._children.remove(proc)
            reply = _json_or_none(out)
            if proc.returncode != 0 or not reply or not reply.get("success"):
                raise DeploymentError(f"registering {key} failed: {out.strip()[-2000:]}")
            node_ids.append(int(reply["node-id"]))
        self.echo(f"registered {len(node_ids)} SuperNode public keys")
        return node_ids

    def start_supernode(self, index: int, num_partitions: int, private_key: Path | None = None,
                        partition_id: int | None = None) -> SuperNode:
        """Start SuperNode `index`, authenticated, training its partition of `num_partitions`.

        `private_key` defaults to the credentials' key for `index` (pass another
        one to start a node the SuperLink does not know); `partition_id`
        defaults to `index`.
        """
        if self.superlink_port is None:
            raise DeploymentError("start the SuperLink before its SuperNodes")
        key = private_key or self.credentials.node_key(index)
        port = free_port()
        node_home = self.workdir / f"supernode-{index}"
        node_home.mkdir(parents=True, exist_ok=True)
        env = {**self.env, "FLWR_HOME": str(node_home)}
        command = [
            self._bin("flower-supernode"),
            "--root-certificates", str(self.credentials.ca_cert),
            "--superlink", f"127.0.0.1:{self.superlink_port}",
            "--auth-supernode-private-key", str(key),
            "--node-config",
            f"partition-id={index if partition_id is None else partition_id} "
            f"num-partitions={num_partitions}",
            "--host", "127.0.0.1", "--port", str(port),
        ]
        log = self.workdir / f"supernode-{index}.log"
        node = SuperNode(index, self._spawn(command, log, env, cwd=node_home), log, port)
        self.supernodes.append(node)
        return node

    def list_nodes(self) -> list[dict]:
        """The SuperLink's SuperNodes (`flwr supernode list`): node-id, status, ..."""
        proc = self._flwr("supernode", "list", CONNECTION, "--format", "json", timeout=120)
        reply = _json_or_none(proc.stdout)
        if proc.returncode != 0 or not reply or not reply.get("success"):
            raise DeploymentError(f"flwr supernode list failed: {proc.stdout[-2000:]}"
                                  f"{proc.stderr[-2000:]}")
        return reply["nodes"]

    def wait_online(self, node_ids: Sequence[int], nodes: Sequence[SuperNode],
                    timeout: float = 120) -> None:
        """Wait until the SuperLink lists every node id online; fail if a node exits.

        The SuperLink's list is the authority; it is asked once every node has
        logged its node id (or every few seconds), since each `flwr` call
        costs a second or two of CPU.
        """
        deadline = time.monotonic() + timeout
        want = {int(n) for n in node_ids}
        ask_at, online = time.monotonic() + 5, set()
        while True:
            for node in nodes:
                self._check_alive(node.process, f"SuperNode {node.index}", node.log)
            logged = all(ACTIVATED_LOG_LINE in node.log.read_text(errors="replace")
                         for node in nodes)
            if logged or time.monotonic() >= ask_at:
                online = {int(n["node-id"]) for n in self.list_nodes()
                          if n["status"] == "online"}
                if want <= online:
                    self.echo(f"{len(want)} SuperNodes online")
                    return
                ask_at = time.monotonic() + 5
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"SuperNodes {sorted(want - online)} not online after {timeout:.0f}s; "
                    f"see the supernode-*.log files in {self.workdir}")
            time.sleep(0.3)

    # --- the run ---------------------------------------------------------------------

    def run_app(self, run_config: Sequence[str] = (), timeout: float | None = None) -> RunResult:
        """`flwr run <app> <connection> --stream`, then the run's status from `flwr ls`.

        Each item of `run_config` is passed as one `--run-config` argument.
        """
        command = [self._bin("flwr"), "run", str(self.app_dir), CONNECTION, "--stream"]
        for item in run_config:
            command += ["--run-config", item]
        log_path = self.workdir / "run.log"
        proc = self._spawn(command, None, self.env, cwd=self.app_dir)
        lines: list[str] = []
        with open(log_path, "w") as log:
            reader = threading.Thread(target=_pump, args=(proc.stdout, log, lines, self.echo),
                                      daemon=True)
            reader.start()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise DeploymentError(f"flwr run still going after {timeout:.0f}s; "
                                      f"see {log_path}") from None
            except BaseException:  # Ctrl-C: end the stream, the reader ends with it
                proc.terminate()
                raise
            finally:
                reader.join(timeout=10)
        output = "".join(lines)
        match = re.search(r"started run (\d+)", output)
        if not match:
            return RunResult(None, "not-started", output)
        run_id = int(match.group(1))
        return RunResult(run_id, self.wait_finished(run_id), output)

    def status(self, run_id: int) -> str:
        """The run's status from `flwr ls`, e.g. 'finished:completed'."""
        proc = self._flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json",
                          timeout=120)
        reply = _json_or_none(proc.stdout)
        if proc.returncode != 0 or not reply or not reply.get("runs"):
            raise DeploymentError(f"flwr ls failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return reply["runs"][0]["status"]

    def wait_finished(self, run_id: int, timeout: float = 60) -> str:
        """Poll the run's status until it has finished (the stream can end first)."""
        deadline = time.monotonic() + timeout
        while not (status := self.status(run_id)).startswith("finished"):
            if time.monotonic() > deadline:
                break
            time.sleep(1)
        return status

    # --- processes -------------------------------------------------------------------

    def processes(self) -> list[int]:
        """PIDs of every live process of this deployment (by the marker in its environment)."""
        return processes_with_marker(self.marker)

    def stop(self, grace: float = 15) -> None:
        """Stop every process of this deployment: SIGTERM by PID, then SIGKILL what is left.

        The `flwr` CLI goes first, then the SuperNodes (they sign off at the
        SuperLink), then the SuperLink; their children (SuperExec, ServerApp,
        ClientApp) follow their parents or are found by the marker.
        """
        nodes = [n.process for n in self.supernodes]
        link = [self.superlink] if self.superlink else []
        others = [p for p in self._children if p not in nodes + link]
        # The CLI first, then the SuperNodes (they sign off at the SuperLink),
        # then the SuperLink.
        for group in (others, nodes, link):
            for proc in group:
                if proc.poll() is None:
                    _signal(proc.pid, signal.SIGTERM)
            _wait_gone(lambda g=group: [p.pid for p in g if p.poll() is None], grace)
        started = others + nodes + link
        # Children outlive their parent for a while (a SuperExec polls its
        # parent's PID): ask them too, then force whatever is left.
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            for pid in self.processes():
                _signal(pid, sig)
            if _wait_gone(self.processes, wait):
                break
        for proc in started:
            if proc.poll() is None:
                _signal(proc.pid, signal.SIGKILL)
            proc.wait()

    def _spawn(self, command: list[str], log: Path | None, env: dict[str, str],
               cwd: Path | None = None) -> subprocess.Popen:
        """Start a process of ours: marked, in its own session, stopped if we die.

        Its output goes to `log`, or to a text pipe when `log` is None.
        """
        stdout: IO | int = open(log, "ab") if log else subprocess.PIPE  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                command, cwd=cwd, env=env, stdout=stdout, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, text=log is None,
                # Own session: a Ctrl-C reaches the launcher only, which stops the
                # rest in order; the parent-death signal covers a launcher killed hard.
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        finally:
            if log:
                stdout.close()  # the child holds its own copy
        self._children.append(proc)
        return proc

    def _flwr(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        """Run a short `flwr` CLI command against our SuperLink."""
        proc = self._spawn([self._bin("flwr"), *args], None, self.env)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise DeploymentError(f"flwr {' '.join(args)} timed out after {timeout}s") from None
        self._children.remove(proc)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")

    def _bin(self, name: str) -> str:
        """Path of a Flower executable next to our Python."""
        path = self.bin_dir / name
        if not path.exists():
            raise DeploymentError(f"{path} not found: install the project (flwr) first")
        return str(path)

    @staticmethod
    def _check_alive(proc: subprocess.Popen | None, name: str, log: Path) -> None:
        """Raise with the end of its log if the process has exited."""
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise DeploymentError(f"{name} exited with code {proc.returncode}; "
                                  f"end of {log}:\n{tail}")


# --- helpers ------------------------------------------------------------------------


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def processes_with_marker(marker: str) -> list[int]:
    """PIDs of live processes (zombies excluded) whose environment holds our marker."""
    needle = f"{MARKER_ENV}={marker}".encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes():
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if state != "Z":
            found.append(int(entry.name))
    return found


def _flower_env(bin_dir: Path, marker: str) -> dict[str, str]:
    """Environment for every Flower process: quiet, offline, our executables first."""
    env = dict(os.environ)
    env.update({
        MARKER_ENV: marker,
        # Flower starts flower-superexec, flwr-serverapp, flwr-clientapp by name.
        "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "WANDB_SILENT": "true",
    })
    return env


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the launcher dies (Linux only)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_gone(pids: Callable[[], list[int]], timeout: float) -> bool:
    """Poll until `pids()` is empty; whether it emptied within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while pids():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _signal(pid: int, sig: signal.Signals) -> None:
    """Send a signal to one PID; a process already gone is fine."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _pump(stream: IO[str], log: IO[str], lines: list[str],
          echo: Callable[[str], None]) -> None:
    """Copy the streamed run output to the log, the caller's echo and a list."""
    for line in stream:
        log.write(line)
        log.flush()
        lines.append(line)
        echo(line.rstrip("\n"))


def _json_or_none(text: str) -> dict | None:
    """The JSON object in a CLI's output, or None (the CLI may print text before it)."""
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        return None


def claim_workdir(workdir: Path) -> IO[str]:
    """Lock the work folder for this deploy and empty it of an earlier one's files.

    Only a folder this launcher made (it holds the stamp file) is emptied, and
    not while another deploy holds its lock. Close the returned handle to
    release the lock.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = workdir / WORKDIR_STAMP
    if not stamp.exists() and any(workdir.iterdir()):
        raise DeploymentError(f"{workdir} is not empty and was not made by "
                              f"`deploy.launch`: choose another --workdir")
    handle = open(stamp, "a+")  # noqa: SIM115 (held for the whole deployment)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise DeploymentError(f"{workdir} is in use by another deploy: wait for it, "
                              f"or choose another --workdir") from None
    for child in workdir.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        elif child.name != WORKDIR_STAMP:
            child.unlink()
    handle.truncate(0)
    handle.write("written by deploy.launch; emptied by the next deploy\n")
    handle.flush()
    return handle


def deploy(num_nodes: int, run_config: Sequence[str], workdir: Path = DEFAULT_WORKDIR,
           timeout: float | None = None,
           echo: Callable[[str], None] = print) -> RunResult:
    """Credentials, SuperLink, N authenticated SuperNodes, one run; everything stopped after.

    Parameters
    ----------
    num_nodes : int
        SuperNodes to start; node i trains partition i of num_nodes.
    run_config : Sequence[str]
        `--run-config` values for `flwr run` (e.g. "num-server-rounds=2").
    workdir : Path
        Folder for credentials, Flower homes and logs (emptied first; locked
        while the deployment runs).
    timeout : float | None
        Seconds the run may take (None: no limit).
    echo : Callable[[str], None]
        Where progress and the run's output go.

    Returns
    -------
    RunResult
        The run id, its final status and its output.

    """
    if num_nodes < 1:
        raise DeploymentError(f"the number of SuperNodes must be >= 1, got {num_nodes}")
    with claim_workdir(workdir):
        creds = generate_credentials(workdir / "credentials", num_nodes)
        echo(f"credentials for {num_nodes} SuperNodes in {creds.folder}")
        with Deployment(workdir, creds, echo=echo) as dep:
            dep.start_superlink()
            node_ids = dep.register([creds.node_public_key(i) for i in range(num_nodes)])
            nodes = [dep.start_supernode(i, num_nodes) for i in range(num_nodes)]
            dep.wait_online(node_ids, nodes)
            result = dep.run_app(run_config, timeout=timeout)
            echo("stopping the SuperNodes and the SuperLink")
    return result


def _raise_interrupt(signum: int, _frame: object) -> None:
    """SIGTERM to the launcher: unwind like Ctrl-C, so everything gets stopped."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of the loopback deployment (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.launch",
        description="Run fedgan on a SuperLink and N SuperNodes on this machine, over TLS "
                    "with SuperNode authentication; stop them all at the end.")
    parser.add_argument("nodes", nargs="?", type=int, default=2,
                        help="number of SuperNodes (default: 2)")
    parser.add_argument("--run-config", action="append", default=[], metavar="'K=V ...'",
                        help="run config overrides passed to `flwr run` (repeatable)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="folder for credentials, Flower homes and logs; emptied at "
                             "the start (default: .deploy/ in the repository)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds the run may take before it is stopped (default: none)")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error(f"the number of SuperNodes must be >= 1, got {args.nodes}")
    signal.signal(signal.SIGTERM, _raise_interrupt)

    def echo(line: str) -> None:
        print(line, flush=True)

    try:
        result = deploy(args.nodes, args.run_config, args.workdir, args.timeout, echo)
    except KeyboardInterrupt:
        print("fedgan deploy: interrupted; every process it started is stopped",
              file=sys.stderr)
        return 130
    except DeploymentError as exc:
        print(f"fedgan deploy: {exc}", file=sys.stderr)
        return 1
    if result.run_id is None:
        print("fedgan deploy: the run did not start (see the messages above)",
              file=sys.stderr)
        return 1
    print(f"fedgan deploy: run {result.run_id} {result.status}", file=sys.stderr)
    return 0 if result.completed else 1


if __name__ == "__main__":
    raise SystemExit(main())
