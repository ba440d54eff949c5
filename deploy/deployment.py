"""A SuperLink, its Fleet gateway and SuperNodes as processes on loopback, with TLS and node auth.

`Deployment` starts each party as Flower's Deployment Engine runs it across
machines (docs/deployment.md): the SuperLink on a loopback port of its own
(its one port also serves the unauthenticated Control API), the Fleet gateway
(``deploy/gateway.py``) as the only port SuperNodes are given, SuperNodes
registered by public key, and ``flwr run`` against it all. It stops what it
started by PID (``deploy/processes.py``): the processes it spawned and their
descendants, never a process for its marker (``FEDGAN_DEPLOYMENT_ID``) alone.
"""

from __future__ import annotations

import json
import os
import re
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

from deploy.credentials import Credentials
from deploy.gateway import DEFAULT_MAX_CONNECTIONS_PER_PEER
from deploy.processes import HOME_KEY, ProcessGroup, flower_env, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
CONNECTION = "fedgan-deploy"
MARKER_ENV = "FEDGAN_DEPLOYMENT_ID"  # every process we start carries it
COMPLETED = "finished:completed"
ACTIVATED_LOG_LINE = "SuperNode ID:"  # a SuperNode logs it once the SuperLink let it in


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
        self.env = flower_env(self.bin_dir)
        self.env.update({MARKER_ENV: self.marker, HOME_KEY: str(self.home)})
        self.superlink: subprocess.Popen | None = None
        self.superlink_port: int | None = None  # loopback only: Control, Fleet, Runtime
        self.gateway: subprocess.Popen | None = None
        self.gateway_port: int | None = None  # what SuperNodes connect to: Fleet only
        self.supernodes: list[SuperNode] = []
        self._group = ProcessGroup()  # what we started, stopped by PID

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
        self.superlink = self._group.spawn(command, self.workdir / "superlink.log", self.env,
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
        self.gateway = self._group.spawn(command, log, self.env, cwd=REPO_ROOT)
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
        procs = [self._group.spawn([self._bin("flwr"), "supernode", "register", str(key),
                              CONNECTION, "--format", "json"], None, self.env)
                 for key in public_keys]
        node_ids = []
        for key, proc in zip(public_keys, procs, strict=True):
            out, _ = proc.communicate(timeout=120)
            self._group.forget(proc)
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
        env = {**self.env, HOME_KEY: str(node_home)}
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
        node = SuperNode(index, self._group.spawn(command, log, env, cwd=node_home), log, port)
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
        proc = self._group.spawn(command, None, self.env, cwd=self.app_dir)
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

        Every process of ours seen is remembered with its start time (see
        `deploy.processes.ProcessGroup`): a child whose parent exits first is
        still known by PID.
        """
        return self._group.processes()

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
        self._group.stop([nodes, link], grace)

    def _flwr(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        """Run a short `flwr` CLI command against our SuperLink."""
        proc = self._group.spawn([self._bin("flwr"), *args], None, self.env)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise DeploymentError(f"flwr {' '.join(args)} timed out after {timeout}s") from None
        self._group.forget(proc)
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
