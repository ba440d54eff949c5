"""Run fedgan on Flower's Deployment Engine on this machine: TLS, SuperNode auth, N nodes.

``python -m deploy.launch [N] [--run-config "k=v ..."]`` (what ``./fedgan.sh deploy``
runs) does what an operator does across machines (docs/deployment.md), with
every party on loopback:

1. writes a CA, the SuperLink's certificate and one key pair per SuperNode
   (``deploy/credentials.py``) into the work folder (default ``.deploy/``);
2. starts ``flower-superlink`` with TLS, ``--enable-supernode-auth`` and the
   runtime dependency installer off, on a free port of 127.0.0.1: its one port
   also serves the unauthenticated Control API, so only this machine reaches it;
3. starts the Fleet gateway (``deploy/gateway.py``) on a second port: the only
   port SuperNodes are given, forwarding their Fleet API calls and nothing else;
4. registers each SuperNode's public key (``flwr supernode register``, on the
   SuperLink's own port);
5. starts N ``flower-supernode`` processes pointed at the gateway, node i with
   ``--node-config "partition-id=i num-partitions=N"`` and its own port, and
   waits until the SuperLink lists them all online;
6. runs the app: ``flwr run . <connection> --stream``, then reads the run's
   final status with ``flwr ls`` (``flwr run --stream`` exits 0 even when the
   ServerApp failed);
7. stops what it started, by PID, also on Ctrl-C, SIGTERM or an error: the
   processes it spawned and their descendants (SuperExec, ServerApp, ClientApp
   processes), found by walking the process tree from its own children and
   remembered by PID and start time, so a parent that dies first does not hide
   its children. Each process also carries a marker in its environment
   (``FEDGAN_DEPLOYMENT_ID``: a fresh id, or the one already in the launcher's
   environment), by which a caller can look for leftovers; the launcher never
   signals a process for its marker alone.

Each party keeps its own Flower home and log in the work folder:
``flwr-home/`` (the SuperLink's state and the CLI's ``config.toml``),
``superlink.log``, ``gateway.log``, ``supernode-<i>/`` and ``supernode-<i>.log``,
``run.log``. The exit status is 0 only when the run finished as ``finished:completed``.
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
from deploy.gateway import DEFAULT_MAX_CONNECTIONS_PER_PEER
from fedgan_app.local_superlink import alive, descendants, process_table

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
    """A SuperLink, its Fleet gateway and SuperNodes on loopback, with TLS and node auth.

    Use it as a context manager: leaving the block stops every process it
    started (and their descendants), whatever happened inside.

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
        self.superlink_port: int | None = None  # loopback only: Control, Fleet, Runtime
        self.gateway: subprocess.Popen | None = None
        self.gateway_port: int | None = None  # what SuperNodes connect to: Fleet only
        self.supernodes: list[SuperNode] = []
        self._children: list[subprocess.Popen] = []
        self._seen: dict[int, int] = {}  # PID -> start time of every process of ours seen

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
        """Start the SuperLink on loopback with TLS and node auth; return once it accepts TLS."""
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
        self._wait_tls(self.superlink, "SuperLink", self.superlink_port,
                       self.workdir / "superlink.log", timeout)
        self.echo(f"SuperLink up on 127.0.0.1:{self.superlink_port} (loopback only; TLS, "
                  f"node auth; pid {self.superlink.pid})")

    def start_gateway(self, timeout: float = 60,
                      max_connections_per_peer: int = DEFAULT_MAX_CONNECTIONS_PER_PEER) -> None:
        """Start the Fleet gateway in front of the SuperLink; return once it accepts TLS."""
        if self.superlink_port is None:
            raise DeploymentError("start the SuperLink before its gateway")
        self.gateway_port = free_port()
        creds = self.credentials
        command = [
            sys.executable, "-m", "deploy.gateway",
            "--listen", f"127.0.0.1:{self.gateway_port}",
            "--superlink", f"127.0.0.1:{self.superlink_port}",
            "--certfile", str(creds.server_cert), "--keyfile", str(creds.server_key),
            "--root-certificates", str(creds.ca_cert),
            "--max-connections-per-peer", str(max_connections_per_peer),
        ]
        # From this repository, where the `deploy` package lives.
        log = self.workdir / "gateway.log"
        self.gateway = self._spawn(command, log, self.env, cwd=REPO_ROOT)
        self._wait_tls(self.gateway, "Fleet gateway", self.gateway_port, log, timeout)
        self.echo(f"Fleet gateway up on 127.0.0.1:{self.gateway_port} (SuperNodes' "
                  f"address; pid {self.gateway.pid})")

    def _write_connection(self) -> None:
        """Name the SuperLink in the CLI's config.toml (address + CA certificate)."""
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f"[superlink.{CONNECTION}]\n"
            f'address = "127.0.0.1:{self.superlink_port}"\n'
            f'root-certificates = "{self.credentials.ca_cert.resolve()}"\n'
        )

    def _wait_tls(self, proc: subprocess.Popen, name: str, port: int, log: Path,
                  timeout: float) -> None:
        """Wait until `proc` on `port` completes a TLS handshake verified by our CA."""
        context = ssl.create_default_context(cafile=str(self.credentials.ca_cert))
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(proc, name, log)
            try:
                with socket.create_connection(("127.0.0.1", port), 1) as raw:
                    with context.wrap_socket(raw, server_hostname="127.0.0.1"):
                        return
            except ssl.SSLCertVerificationError as exc:
                raise DeploymentError(
                    f"the {name}'s certificate does not verify against "
                    f"{self.credentials.ca_cert}: {exc.verify_message}") from exc
            except OSError:
                if time.monotonic() > deadline:
                    raise DeploymentError(
                        f"the {name} did not accept TLS connections within {timeout:.0f}s"
                        f"; see {log}") from None
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
                        partition_id: int | None = None,
                        extra_args: Sequence[str] = ()) -> SuperNode:
        """Start SuperNode `index`, authenticated, training its partition of `num_partitions`.

        It reaches the SuperLink through the Fleet gateway. `private_key`
        defaults to the credentials' key for `index` (pass another one to start
        a node the SuperLink does not know); `partition_id` defaults to
        `index`; `extra_args` go to `flower-supernode` as they are.
        """
        if self.gateway_port is None:
            raise DeploymentError("start the SuperLink and its gateway before SuperNodes")
        key = private_key or self.credentials.node_key(index)
        port = free_port()
        node_home = self.workdir / f"supernode-{index}"
        node_home.mkdir(parents=True, exist_ok=True)
        env = {**self.env, "FLWR_HOME": str(node_home)}
        command = [
            self._bin("flower-supernode"),
            "--root-certificates", str(self.credentials.ca_cert),
            "--superlink", f"127.0.0.1:{self.gateway_port}",
            "--auth-supernode-private-key", str(key),
            "--node-config",
            f"partition-id={index if partition_id is None else partition_id} "
            f"num-partitions={num_partitions}",
            "--host", "127.0.0.1", "--port", str(port),
            *extra_args,
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

    def list_runs(self) -> list[dict]:
        """The SuperLink's runs (`flwr ls`): run-id, status, ..."""
        proc = self._flwr("ls", CONNECTION, "--format", "json", timeout=120)
        reply = _json_or_none(proc.stdout)
        if proc.returncode != 0 or not reply or not reply.get("success"):
            raise DeploymentError(f"flwr ls failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return reply["runs"]

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
            self.processes()  # note each node's SuperExec while its parent lives
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
                self._wait_watching(proc, timeout)
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

    def _wait_watching(self, proc: subprocess.Popen, timeout: float | None) -> None:
        """Wait for `proc`, noting the deployment's process tree every second meanwhile.

        A ClientApp whose SuperNode dies is re-parented away from our tree;
        noted while its parent lived, it is still stopped by PID.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.processes()
            try:
                proc.wait(timeout=1)
                return
            except subprocess.TimeoutExpired:
                if deadline is not None and time.monotonic() > deadline:
                    raise

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
        """PIDs of the live processes of this deployment: those it started, their descendants.

        Walks the process tree from our children and from every process of
        ours seen before (remembered with its start time, so a PID taken over
        by another process is never ours), and remembers what it finds: a child
        whose parent exits first is still known by PID.
        """
        table = process_table()
        roots = {p.pid for p in self._children if p.returncode is None} | set(self._live_seen())
        for root in roots:
            for pid in (root, *descendants(root, table)):
                if pid not in self._seen and (start := _start_time(pid)) is not None:
                    self._seen[pid] = start
        return self._live_seen()

    def _live_seen(self) -> list[int]:
        """The remembered processes that still run (same PID, same start time)."""
        return [pid for pid, start in self._seen.items()
                if _start_time(pid) == start and alive(pid)]

    def stop(self, grace: float = 15) -> None:
        """Stop every process of this deployment: SIGTERM by PID, then SIGKILL what is left.

        Only what this deployment started and their descendants are signalled
        (see `processes`), never a process for its marker alone: the shell or
        program that started the launcher carries the same marker. The `flwr`
        CLI goes first, then the SuperNodes (they sign off through the
        gateway), then the SuperLink and the gateway; their children
        (SuperExec, ServerApp, ClientApp) follow their parents or are signalled
        after them.
        """
        nodes = [n.process for n in self.supernodes]
        link = [p for p in (self.superlink, self.gateway) if p is not None]
        others = [p for p in self._children if p not in nodes + link]
        for group in (others, nodes, link):
            self.processes()  # the tree below this group, before its parents go
            for proc in group:
                if proc.poll() is None:
                    _signal(proc.pid, signal.SIGTERM)
            _wait_gone(lambda g=group: [p.pid for p in g if p.poll() is None], grace)
        # Children outlive their parent for a while (a SuperExec polls its
        # parent's PID): ask them too, then force whatever is left.
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            for pid in self.processes():
                _signal(pid, sig)
            if _wait_gone(self._live_seen, wait):
                break
        for proc in others + nodes + link:
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
    """PIDs of live processes (zombies excluded) whose environment holds our marker.

    For a caller looking for a deployment's leftovers; `Deployment.stop` never
    signals by marker.
    """
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
    # Flower's internal switches that would also open the legacy gRPC Control and
    # Fleet servers, on their own (public) addresses beside the loopback port.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_INTERNAL_GRPC_")}
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


def _start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


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
    """Credentials, SuperLink, gateway, N authenticated SuperNodes, one run; all stopped after.

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
            # Every node connects from 127.0.0.1 here: one peer, up to 4 connections each.
            dep.start_gateway(max_connections_per_peer=max(DEFAULT_MAX_CONNECTIONS_PER_PEER,
                                                           8 * num_nodes))
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
