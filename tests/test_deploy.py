"""End to end on Flower's Deployment Engine: a real SuperLink and SuperNodes as processes.

Every party runs as its own process on loopback, over TLS, with SuperNode
authentication, started and stopped by `deploy.launch` (the code behind
`./fedgan.sh deploy`). Each ClientApp call is a fresh process that imports
torch, so the runs are as small as they can be.
"""

from __future__ import annotations

import csv
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
from flwr.supercore.error import ApiErrorCode
from flwr.supercore.exit import ExitCode

from deploy.credentials import Credentials, generate_credentials, write_node_key_pair
from deploy.launch import (
    MARKER_ENV,
    WORKDIR_STAMP,
    Deployment,
    DeploymentError,
    SuperNode,
    claim_workdir,
    processes_with_marker,
)
from tests.flwr_local import REPO_ROOT, alive, descendants, process_table

# Two local steps on 16 images, a 100-image quality check, no client evaluation.
TINY = ("local-steps=2 batch-size=16 eval-samples=100 fraction-evaluate=0.0 "
        "wandb-mode='disabled'")


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _run_config(out: Path, rounds: int, **extra: str) -> list[str]:
    """One --run-config value: the tiny run writing into `out/run`."""
    more = " ".join(f"{k}={v}" for k, v in extra.items())
    return [f"{TINY} num-server-rounds={rounds} output-dir='{out}' run-name='run' {more}"]


def _tls_handshake(port: int, context: ssl.SSLContext) -> None:
    """Complete a TLS handshake with the SuperLink on loopback, verifying its certificate."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1"):
            pass


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    """A CA, the SuperLink's certificate, 2 node key pairs and 1 pair never registered."""
    folder = tmp_path_factory.mktemp("credentials")
    creds = generate_credentials(folder, 2)
    write_node_key_pair(folder / "stranger", folder / "stranger.pub")
    return creds


@dataclass
class Federation:
    """A running deployment: 2 registered SuperNodes and one whose key is unknown."""

    deployment: Deployment
    node_ids: list[int]
    nodes: list[SuperNode]
    stranger: SuperNode
    outputs: Path


@pytest.fixture(scope="module")
def federation(credentials: Credentials,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """One SuperLink shared by the run, refused-node and killed-node tests; stopped after."""
    workdir = tmp_path_factory.mktemp("federation")
    dep = Deployment(workdir, credentials)
    try:
        dep.start_superlink()
        node_ids = dep.register([credentials.node_public_key(i) for i in range(2)])
        nodes = [dep.start_supernode(i, 2) for i in range(2)]
        stranger = dep.start_supernode(2, 2, private_key=credentials.folder / "stranger",
                                       partition_id=0)
        dep.wait_online(node_ids, nodes)
        yield Federation(dep, node_ids, nodes, stranger, workdir / "outputs")
    finally:
        dep.stop()
    assert dep.processes() == [], "processes of the deployment left running"


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


def _kill_when_training(node: SuperNode, killed: threading.Event,
                        timeout: float = 300) -> None:
    """SIGKILL the SuperNode (by PID) once its ClientApp process is running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and node.process.poll() is None:
        table = process_table()
        if any("flwr-clientapp" in table[pid][1] and alive(pid)
               for pid in descendants(node.pid, table)):
            os.kill(node.pid, signal.SIGKILL)
            killed.set()
            return
        time.sleep(0.2)


@pytest.mark.e2e
def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    # Prepare: the command line a user runs, marked so its processes can be found
    marker = f"test-{os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, MARKER_ENV: marker}
    command = [sys.executable, "-m", "deploy.launch", "2", "--workdir", str(tmp_path / "wd"),
               "--run-config", _run_config(tmp_path / "outputs", 5)[0]]
    launcher = subprocess.Popen(command, cwd=REPO_ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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
    assert processes_with_marker(marker) == []


# The three tests below share one SuperLink (module fixture `federation`); they come
# last, so it is stopped right after them and idles beside no other test.


@pytest.mark.e2e
def test_two_authenticated_supernodes_complete_a_run_over_tls(federation: Federation,
                                                              credentials: Credentials) -> None:
    # Prepare
    port = federation.deployment.superlink_port

    # Execute
    result = federation.deployment.run_app(_run_config(federation.outputs, 2), timeout=600)

    # Assert: TLS with a certificate of our CA (the system's CAs reject it)
    _tls_handshake(port, ssl.create_default_context(cafile=str(credentials.ca_cert)))
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(port, ssl.create_default_context())
    # completed, with both registered nodes training in both rounds
    assert result.completed, result.output[-3000:]
    run_dir = federation.outputs / "run"
    rows = _read_csv(run_dir / "metrics.csv")
    assert [r["round"] for r in rows] == ["1", "2"]
    for row in rows:
        assert float(row["replies-accepted"]) == 2, row
        assert float(row["replies-failed"]) == float(row["replies-missing"]) == 0, row
    assert float(rows[-1]["fid"]) > 0
    assert (run_dir / "checkpoints" / "latest.pt").is_file()
    assert (run_dir / "samples" / "round_0002.png").is_file()


@pytest.mark.e2e
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
def test_killed_supernode_is_counted_failed_and_run_finishes(federation: Federation) -> None:
    # Prepare: node 1 is SIGKILLed while it trains in round 1 (this test comes
    # last: the federation has one registered node left after it).
    # Flower answers for a node that misses its heartbeats (within 2 x 30 s) with
    # an error reply, "Node Unavailable": a failed reply, as long as the round
    # waits that long (round-timeout); a shorter timeout would count it missing.
    node = federation.nodes[1]
    outputs = federation.outputs / "killed"
    killed = threading.Event()
    killer = threading.Thread(target=_kill_when_training, args=(node, killed))
    killer.start()

    # Execute
    result = federation.deployment.run_app(
        _run_config(outputs, 1, **{"round-timeout": "300"}), timeout=600)
    killer.join()

    # Assert: the kill happened mid-run, the run completed, the failure is counted
    assert killed.is_set() and node.process.wait(timeout=30) == -signal.SIGKILL
    assert result.completed, result.output[-3000:]
    (row,) = _read_csv(outputs / "run" / "metrics.csv")
    assert float(row["replies-accepted"]) == 1, row
    assert float(row["replies-failed"]) == 1, row
    assert float(row["replies-missing"]) == 0, row


def _wait_for_text(path: Path, text: str, timeout: float) -> str:
    """Poll a log file until it holds `text`; return the log."""
    deadline = time.monotonic() + timeout
    while True:
        log = path.read_text(errors="replace") if path.exists() else ""
        if text in log or time.monotonic() > deadline:
            assert text in log, log[-2000:]
            return log
        time.sleep(0.5)
