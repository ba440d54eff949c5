"""End to end on Flower's Deployment Engine: a real SuperLink and SuperNodes as processes.

Every party runs as its own process on loopback, over TLS, with SuperNode
authentication, started and stopped by `deploy.deployment` (behind `deploy.launch`,
the code of `./fedgan.sh deploy`): the SuperLink on a loopback port of its own (Control,
Fleet and Runtime APIs), SuperNodes through the Fleet gateway
(`deploy.gateway`), which forwards their calls and nothing else. Each ClientApp
call is a fresh process that imports torch, so the runs are as small as they
can be.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.supercore.error import ApiErrorCode
from flwr.supercore.exit import ExitCode
from flwr.superlink.routers.fleet.router import router as superlink_fleet_router

from deploy.credentials import Credentials, generate_credentials, write_node_key_pair
from deploy.deployment import (
    MARKER_ENV,
    REPO_ROOT,
    Deployment,
    DeploymentError,
    SuperNode,
    processes_with_marker,
)
from deploy.gateway import FLEET_PATHS
from deploy.launch import WORKDIR_STAMP, claim_workdir
from deploy.processes import alive, descendants, free_port, process_table, wait_gone
from fedgan_app.outputs.runfolder import read_rows
from harness.signals import ctrl_c_as_typed

# Two local steps on 16 images, a 100-image quality check, no client evaluation.
TINY = ("local-steps=2 batch-size=16 eval-samples=100 audit-samples=0 fraction-evaluate=0.0 "
        "wandb-mode='disabled'")


def _run_config(out: Path, rounds: int, **extra: str) -> list[str]:
    """One --run-config value: the tiny run writing into `out/run`."""
    more = " ".join(f"{k}={v}" for k, v in extra.items())
    return [f"{TINY} num-server-rounds={rounds} output-dir='{out}' run-name='run' {more}"]


def _tls_handshake(port: int, context: ssl.SSLContext) -> None:
    """Complete a TLS handshake with a server on loopback, verifying its certificate."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1"):
            pass


def _http_status(port: int, ca_cert: Path, request: str) -> int:
    """Send one raw HTTP/1.1 request over TLS, byte for byte; the reply's status code."""
    context = ssl.create_default_context(cafile=str(ca_cert))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(request.encode())
            reply = tls.recv(4096)
    return int(reply.split(b" ", 2)[1])


def _listening(pid: int) -> set[tuple[str, int]]:
    """The (address, port) pairs process `pid` listens on, from /proc/net/tcp{,6}."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                host, port = fields[1].split(":")
                found.add((_kernel_address(host), int(port, 16)))
    return found


def _kernel_address(hex_address: str) -> str:
    """An address as /proc/net/tcp writes it (32-bit words in host byte order)."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    """A CA, the SuperLink's certificate, 2 node key pairs and 1 pair never registered."""
    folder = tmp_path_factory.mktemp("credentials")
    creds = generate_credentials(folder, 2)
    write_node_key_pair(folder / "stranger", folder / "stranger.pub")
    return creds


@dataclass
class Federation:
    """A running deployment: SuperLink, gateway, 2 registered SuperNodes, 1 unknown one."""

    deployment: Deployment
    node_ids: list[int]
    nodes: list[SuperNode]
    stranger: SuperNode
    outputs: Path


@pytest.fixture(scope="module")
def federation(credentials: Credentials,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """One SuperLink shared by the tests at the end of this file; stopped after them."""
    workdir = tmp_path_factory.mktemp("federation")
    dep = Deployment(workdir, credentials)
    try:
        dep.start_superlink()
        dep.start_gateway()
        node_ids = dep.register([credentials.node_public_key(i) for i in range(2)])
        nodes = [dep.start_supernode(i, 2) for i in range(2)]
        stranger = dep.start_supernode(2, 2, private_key=credentials.folder / "stranger",
                                       partition_id=0)
        dep.wait_online(node_ids, nodes)
        yield Federation(dep, node_ids, nodes, stranger, workdir / "outputs")
    finally:
        dep.stop()
    assert dep.processes() == [], "processes of the deployment left running"
    # also none that left the deployment's process tree (a killed node's children)
    assert processes_with_marker(dep.marker) == [], "processes of the deployment left running"


def test_work_folder_is_emptied_for_a_new_deploy_but_not_while_one_runs(tmp_path: Path) -> None:
    # Prepare: an earlier deploy's folder
    workdir = tmp_path / "wd"
    with claim_workdir(workdir):
        (workdir / "credentials").mkdir()
        (workdir / "superlink.log").write_text("old")

    # Execute
    with claim_workdir(workdir):
        left = sorted(p.name for p in workdir.iterdir())
        with pytest.raises(DeploymentError, match="in use by another deploy"):
            claim_workdir(workdir)

    # Assert
    assert left == [WORKDIR_STAMP]


def test_foreign_work_folder_is_refused(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "notes.txt").write_text("mine")

    # Execute / Assert: nothing of it is touched
    with pytest.raises(DeploymentError, match="not made by"):
        claim_workdir(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_gateway_forwards_exactly_the_superlinks_fleet_routes() -> None:
    # Prepare / Execute: the routes Flower's SuperLink serves as its Fleet API
    routes = {(route.path, method) for route in superlink_fleet_router.routes
              for method in route.methods}

    # Assert: all POST, and the gateway's allow-list is exactly their paths
    assert routes == {(path, "POST") for path in FLEET_PATHS}


def _closed_by_server(conn: ssl.SSLSocket, within: float) -> bool:
    """Whether the server closes the connection within `within` seconds (no data sent)."""
    conn.settimeout(within)
    try:
        return conn.recv(1) == b""
    except (ssl.SSLEOFError, ConnectionResetError):
        return True
    except TimeoutError:
        return False


# Run by the parent shell below: a deployment that starts its SuperLink and gateway,
# stops them, and reports what ran before and after.
_STOP_SCRIPT = """
import json, sys
from pathlib import Path
from deploy.credentials import generate_credentials
from deploy.deployment import Deployment
work = Path(sys.argv[1])
with Deployment(work / "wd", generate_credentials(work / "creds", 0)) as dep:
    dep.start_superlink()
    dep.start_gateway()
    started = dep.processes()
print(json.dumps({"marker": dep.marker, "started": started, "left": dep.processes()}))
"""


@pytest.mark.slow
def test_stop_spares_the_parent_shell_that_carries_the_marker(tmp_path: Path) -> None:
    # Prepare: a shell with the deployment's marker in its environment runs the
    # deployment, as `FEDGAN_DEPLOYMENT_ID=x ./fedgan.sh deploy` does
    marker = f"test-{os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, MARKER_ENV: marker, "STOP_SCRIPT": _STOP_SCRIPT}
    command = ["bash", "-c", f'"{sys.executable}" -c "$STOP_SCRIPT" "$0"; '
                             f'echo "parent survived, deployment exited $?"', str(tmp_path)]

    # Execute
    shell = subprocess.Popen(command, cwd=REPO_ROOT, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = shell.communicate(timeout=180)
    finally:
        if shell.poll() is None:
            for pid in descendants(shell.pid, process_table()) + [shell.pid]:
                os.kill(pid, signal.SIGKILL)
            shell.wait()

    # Assert: the shell lived on after stop(); the deployment's own processes
    # (SuperLink, its SuperExec, the gateway) ran, then were all gone
    assert shell.returncode == 0, output[-3000:]
    assert "parent survived, deployment exited 0" in output, output[-3000:]
    report = json.loads(next(line for line in output.splitlines() if line.startswith("{")))
    assert report["marker"] == marker
    assert len(report["started"]) >= 3, report
    assert report["left"] == []
    assert not any(alive(pid) for pid in report["started"])
    assert processes_with_marker(marker) == []


def _kill_when_training(node: SuperNode, killed: threading.Event,
                        run_over: threading.Event) -> None:
    """SIGKILL the SuperNode (by PID) once its ClientApp process runs a train message.

    (A partition query before the round runs a ClientApp too; the node's log
    holds earlier runs, so only what it logs from now on counts.) Gives up
    when the run is over.
    """
    logged_before = node.log.stat().st_size
    while not run_over.is_set() and node.process.poll() is None:
        table = process_table()
        with open(node.log, "rb") as log:
            log.seek(logged_before)
            training = b"Receiving: train message" in log.read()
        if training and any("flwr-clientapp" in table[pid][1] and alive(pid)
                            for pid in descendants(node.pid, table)):
            os.kill(node.pid, signal.SIGKILL)
            killed.set()
            return
        time.sleep(0.2)


@pytest.mark.e2e
@pytest.mark.slow
def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    # Prepare: the command line a user runs, marked so its processes can be found
    marker = f"test-{os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, MARKER_ENV: marker}
    command = [sys.executable, "-m", "deploy.launch", "2", "--workdir", str(tmp_path / "wd"),
               "--run-config", _run_config(tmp_path / "outputs", 5)[0]]
    launcher = subprocess.Popen(command, cwd=REPO_ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                preexec_fn=ctrl_c_as_typed)
    seen = []
    try:
        for line in launcher.stdout:
            seen.append(line)
            if "started run" in line:
                break
        running = processes_with_marker(marker)

        # Execute: Ctrl-C while the run is on
        launcher.send_signal(signal.SIGINT)
        rest, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()

    # Assert: the run had started with its SuperLink and nodes; now all are gone
    output = "".join(seen) + rest
    assert any("started run" in line for line in seen), output[-3000:]
    assert len(running) >= 4, output[-3000:]  # SuperLink, 2 SuperNodes, their SuperExecs
    assert launcher.returncode == 130, output[-3000:]
    assert "interrupted" in rest
    # The launcher adopts orphans (a process forked as the stop began, whose
    # parent was stopped before the launcher saw it, once outlived it: seen once
    # in three suite runs before the launcher became its tree's subreaper) and
    # kills what it finds; a SIGKILLed process may take an instant to go.
    wait_gone(lambda: processes_with_marker(marker), 5)
    left = processes_with_marker(marker)
    assert left == [], [_command_line(pid) for pid in left]


def _command_line(pid: int) -> str:
    """A process's command line ('' once it is gone)."""
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# The tests below share one SuperLink (module fixture `federation`); they come
# last, so it is stopped right after them and idles beside no other test.


@pytest.mark.slow
def test_superlink_listens_on_loopback_only(federation: Federation) -> None:
    # Prepare
    dep = federation.deployment
    superlink = dep.superlink.pid

    # Execute: what every process of the deployment listens on, as the kernel says
    listening = {pid: _listening(pid) for pid in dep.processes()}

    # Assert: the SuperLink's one port (Control, Fleet and Runtime APIs) is on
    # 127.0.0.1 only; SuperNodes are given the gateway's port, which here is on
    # loopback too (across machines it is the one public port)
    assert listening[superlink] == {("127.0.0.1", dep.superlink_port)}
    assert listening[dep.gateway.pid] == {("127.0.0.1", dep.gateway_port)}
    for pid, addresses in listening.items():
        assert all(ipaddress.ip_address(host).is_loopback for host, _ in addresses), (
            pid, addresses)


@pytest.mark.slow
def test_gateway_refuses_everything_but_fleet_calls(federation: Federation,
                                                    credentials: Credentials) -> None:
    # Prepare: what a participant could send to the one port it reaches
    dep = federation.deployment
    post = "POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    refused = {
        "GET /docs": "GET /docs HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /openapi.json": "GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /health": "GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
        "control": post.format("/v1/control/list-runs"),
        "runtime": post.format("/v1/runtime/pull-task-input"),
        "wrong method": "GET /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\n\r\n",
        "odd method": "PROPFIND /v1/control/list-runs HTTP/1.1\r\nHost: x\r\n\r\n",
        "dot segments": post.format("/v1/fleet/../control/list-runs"),
        "encoded dots": post.format("/v1/fleet/%2e%2e/control/list-runs"),
        "query": post.format("/v1/fleet/get-run?x=1"),
    }
    fleet = "POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\ncontent-type: application/protobuf\r\n"

    # Execute
    statuses = {name: _http_status(dep.gateway_port, credentials.ca_cert, request)
                for name, request in refused.items()}
    too_big = _http_status(dep.gateway_port, credentials.ca_cert,
                           fleet + "Content-Length: 999999999999\r\n\r\n")
    no_length = _http_status(dep.gateway_port, credentials.ca_cert,
                             fleet + "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    unsigned = _http_status(dep.gateway_port, credentials.ca_cert,
                            fleet + "Content-Length: 0\r\n\r\n")

    # Assert: every non-Fleet request refused and logged; bodies bounded; a real
    # Fleet call reaches the SuperLink, whose node authentication refuses it
    # unsigned (401 comes from the SuperLink, not from the gateway)
    assert statuses == dict.fromkeys(refused, 403)
    assert (too_big, no_length) == (413, 411)
    assert unsigned == 401
    log = (dep.workdir / "gateway.log").read_text()
    for path in ("'/docs'", "'/v1/control/list-runs'", "'/v1/runtime/pull-task-input'",
                 "'/v1/fleet/../control/list-runs'"):
        assert f"refused 'POST' {path}" in log or f"refused 'GET' {path}" in log, path
    assert "refused 'PROPFIND' '/v1/control/list-runs'" in log


@pytest.mark.slow
def test_gateway_bounds_one_peers_connections_and_stalls(federation: Federation,
                                                        credentials: Credentials,
                                                        tmp_path: Path) -> None:
    # Prepare: a second gateway in front of the SuperLink, allowing 2 connections
    # per client address and 2 s of silence (before a request, within a body)
    port, log = free_port(), tmp_path / "gateway.log"
    command = [sys.executable, "-m", "deploy.gateway", "--listen", f"127.0.0.1:{port}",
               "--superlink", f"127.0.0.1:{federation.deployment.superlink_port}",
               "--certfile", str(credentials.server_cert),
               "--keyfile", str(credentials.server_key),
               "--root-certificates", str(credentials.ca_cert),
               "--max-connections-per-peer", "2", "--timeout", "2"]
    context = ssl.create_default_context(cafile=str(credentials.ca_cert))
    with open(log, "wb") as out:
        gateway = subprocess.Popen(command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
    conns: list[ssl.SSLSocket] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _tls_handshake(port, context)
                break
            except OSError:
                assert gateway.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        time.sleep(0.5)  # the probe's connection is closed on the gateway's side too

        # Execute: one peer opens 3 connections and sends nothing...
        for _ in range(3):
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            conns.append(context.wrap_socket(raw, server_hostname="127.0.0.1"))
        third_closed = _closed_by_server(conns[2], within=1)
        first_open_at_once = not _closed_by_server(conns[0], within=0.5)
        started = time.monotonic()
        first_closed = _closed_by_server(conns[0], within=10)
        silent_for = time.monotonic() - started
        for conn in conns:
            conn.close()
        time.sleep(0.5)
        # ... then starts a Fleet call and stops sending its body
        started = time.monotonic()
        stalled = _http_status(port, credentials.ca_cert,
                               "POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\n"
                               "content-type: application/protobuf\r\n"
                               "Content-Length: 100\r\n\r\n" + "x" * 10)
        stalled_for = time.monotonic() - started
    finally:
        for conn in conns:
            conn.close()
        gateway.terminate()
        gateway.wait(timeout=30)

    # Assert: the third connection was closed at once, the first after 2 s without
    # a request; the stalled call was given up after 2 s (502: nothing forwarded)
    assert third_closed
    assert first_open_at_once and first_closed and silent_for < 5, silent_for
    assert "refused a connection from 127.0.0.1: 2 open already" in log.read_text()
    assert stalled == 502 and 1.5 < stalled_for < 6, (stalled, stalled_for)


_FOREIGN_APP = """
from pathlib import Path

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid, context):
    Path(__file__).with_name("ran-on-the-superlink").write_text("owned")
"""


def _foreign_app(folder: Path) -> Path:
    """A participant's own Flower app: its ServerApp writes a file when it runs."""
    (folder / "foreignapp").mkdir(parents=True)
    (folder / "foreignapp" / "__init__.py").write_text("")
    (folder / "foreignapp" / "app.py").write_text(_FOREIGN_APP)
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "foreignapp"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
        '[tool.flwr.app]\npublisher = "participant"\n\n'
        '[tool.flwr.app.components]\nserverapp = "foreignapp.app:server"\n'
        'clientapp = "foreignapp.app:client"\n\n[tool.flwr.app.config]\n')
    return folder


@pytest.mark.slow
def test_a_run_submitted_through_the_gateway_is_refused(federation: Federation,
                                                        credentials: Credentials,
                                                        tmp_path: Path) -> None:
    # Prepare: a participant's `flwr` pointed at the address it can reach, the
    # gateway (SuperNodes' --superlink), with the federation's CA
    dep = federation.deployment
    app = _foreign_app(tmp_path / "app")
    home = tmp_path / "participant-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink.reachable]\naddress = "127.0.0.1:{dep.gateway_port}"\n'
        f'root-certificates = "{credentials.ca_cert.resolve()}"\n')
    runs_before = {run["run-id"] for run in dep.list_runs()}

    # Execute
    submit = subprocess.run([str(dep.bin_dir / "flwr"), "run", str(app), "reachable", "--stream"],
                            env={**dep.env, "FLWR_HOME": str(home)}, capture_output=True,
                            text=True, timeout=120)

    # Assert: refused at the gateway with 403; no run on the SuperLink (asked on
    # its own, loopback, Control API); the app's code ran nowhere
    output = submit.stdout + submit.stderr
    assert submit.returncode != 0, output[-3000:]
    assert "403 Forbidden" in output, output[-3000:]
    assert {run["run-id"] for run in dep.list_runs()} == runs_before
    assert "refused 'POST' '/v1/control/start-run'" in (dep.workdir / "gateway.log").read_text()
    assert not list(tmp_path.rglob("ran-on-the-superlink"))


@pytest.mark.e2e
@pytest.mark.slow
def test_two_authenticated_supernodes_complete_a_run_over_tls(federation: Federation,
                                                              credentials: Credentials) -> None:
    # Prepare
    dep = federation.deployment

    # Execute: the nodes reach the SuperLink only through the gateway
    result = dep.run_app(_run_config(federation.outputs, 2), timeout=600)

    # Assert: TLS with a certificate of our CA on both ports (the system's CAs reject it)
    for port in (dep.superlink_port, dep.gateway_port):
        _tls_handshake(port, ssl.create_default_context(cafile=str(credentials.ca_cert)))
        with pytest.raises(ssl.SSLCertVerificationError):
            _tls_handshake(port, ssl.create_default_context())
    # completed, with both registered nodes training in both rounds
    assert result.completed, result.output[-3000:]
    run_dir = federation.outputs / "run"
    rows = read_rows(run_dir / "metrics.csv")
    assert [r["round"] for r in rows] == ["1", "2"]
    for row in rows:
        assert float(row["replies-accepted"]) == 2, row
        assert float(row["replies-failed"]) == float(row["replies-missing"]) == 0, row
    assert float(rows[-1]["fid"]) > 0
    assert (run_dir / "checkpoints" / "latest.pt").is_file()
    assert (run_dir / "samples" / "round_0002.png").is_file()


@pytest.mark.e2e
@pytest.mark.slow
def test_supernode_with_unregistered_key_is_refused(federation: Federation) -> None:
    # Prepare: the stranger was started beside the two registered nodes, same flags
    stranger = federation.stranger
    refused = f"[code: {int(ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED)}]"

    # Execute: wait for its verdict (the process itself lingers a while after it)
    log = _wait_for_text(stranger.log, refused, timeout=120)

    # Assert: refused at activation, for its unknown key; only the registered
    # nodes are known to the SuperLink, and both are online
    assert f"Exit Code: {ExitCode.SUPERNODE_CONNECTION_ERROR}" in log, log[-2000:]
    superlink_log = (federation.deployment.workdir / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log
    listed = {int(n["node-id"]): n["status"] for n in federation.deployment.list_nodes()}
    assert listed == {node_id: "online" for node_id in federation.node_ids}
    assert all(node.process.poll() is None for node in federation.nodes)


@pytest.mark.e2e
@pytest.mark.slow
def test_killed_supernode_is_counted_failed_and_run_finishes(federation: Federation) -> None:
    # Prepare: node 1 is SIGKILLed while it trains in round 1 (the federation has
    # one registered node left after it).
    # Flower answers for a node that misses its heartbeats (within 2 x 30 s) with
    # an error reply, "Node Unavailable": a failed reply, as long as the round
    # waits that long (round-timeout); a shorter timeout would count it missing.
    node = federation.nodes[1]
    outputs = federation.outputs / "killed"
    killed, run_over = threading.Event(), threading.Event()
    killer = threading.Thread(target=_kill_when_training, args=(node, killed, run_over))
    killer.start()

    # Execute
    try:
        result = federation.deployment.run_app(
            _run_config(outputs, 1, **{"round-timeout": "300"}), timeout=600)
    finally:
        run_over.set()
        killer.join()

    # Assert: the kill happened mid-run, the run completed, the failure is counted
    assert killed.is_set() and node.process.wait(timeout=30) == -signal.SIGKILL
    assert result.completed, result.output[-3000:]
    (row,) = read_rows(outputs / "run" / "metrics.csv")
    assert float(row["replies-accepted"]) == 1, row
    assert float(row["replies-failed"]) == 1, row
    assert float(row["replies-missing"]) == 0, row


@pytest.mark.e2e
@pytest.mark.slow
def test_supernode_with_trusted_entities_refuses_an_unsigned_app(federation: Federation,
                                                                tmp_path: Path) -> None:
    # Prepare: after the killed-node test, node 0 is the one node left; beside it a
    # registered node that runs only apps signed by a trusted entity (an ed25519
    # key of the operator's). Flower 1.41's SuperLink signs nothing submitted by
    # `flwr run .`, the operator's own app included.
    dep = federation.deployment
    operator_key = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    trusted = tmp_path / "trusted-entities.yaml"
    trusted.write_text(f"fpk_operator: '{operator_key}'\n")
    write_node_key_pair(tmp_path / "wary", tmp_path / "wary.pub")
    (wary_id,) = dep.register([tmp_path / "wary.pub"])
    wary = dep.start_supernode(3, 2, private_key=tmp_path / "wary", partition_id=1,
                               extra_args=["--trusted-entities", str(trusted)])
    dep.wait_online([federation.node_ids[0], wary_id], [federation.nodes[0], wary])
    outputs = federation.outputs / "trusted"

    # Execute: fedgan, submitted as the operator submits it
    result = dep.run_app(_run_config(outputs, 1), timeout=600)

    # Assert: the wary node refused the unsigned app (an error reply, counted as
    # failed); node 0 trained and the run completed
    assert result.completed, result.output[-3000:]
    (row,) = read_rows(outputs / "run" / "metrics.csv")
    assert float(row["replies-accepted"]) == 1, row
    assert float(row["replies-failed"]) == 1, row
    log = wary.log.read_text(errors="replace")
    assert "App verification is not supported by the connected SuperLink" in log, log[-2000:]
    assert "Received successfully" not in log  # no message content was taken in


def _wait_for_text(path: Path, text: str, timeout: float) -> str:
    """Poll a log file until it holds `text`; return the log."""
    deadline = time.monotonic() + timeout
    while True:
        log = path.read_text(errors="replace") if path.exists() else ""
        if text in log or time.monotonic() > deadline:
            assert text in log, log[-2000:]
            return log
        time.sleep(0.5)
