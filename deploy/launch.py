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
   its children; the launcher is their subreaper (Linux), so an orphan becomes
   its child rather than init's and is found too. Each process also carries a
   marker in its environment (``FEDGAN_DEPLOYMENT_ID``: a fresh id, or the one
   already in the launcher's environment), by which a caller can look for
   leftovers; the launcher never signals a process for its marker alone.

This module is the command line and the work folder; ``deploy/deployment.py``
starts and stops the parties (`Deployment`), and ``deploy/processes.py`` holds
the process control (ports, Flower's environment, stop by PID) that the test
harness shares.

Each party keeps its own Flower home and log in the work folder:
``flwr-home/`` (the SuperLink's state and the CLI's ``config.toml``),
``superlink.log``, ``gateway.log``, ``supernode-<i>/`` and ``supernode-<i>.log``,
``run.log``. The exit status is 0 only when the run finished as ``finished:completed``.
"""

from __future__ import annotations

import argparse
import fcntl
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from deploy.credentials import generate_credentials
from deploy.deployment import REPO_ROOT, Deployment, DeploymentError, RunResult
from deploy.gateway import DEFAULT_MAX_CONNECTIONS_PER_PEER
from deploy.processes import adopt_orphans, reap_orphans

DEFAULT_WORKDIR = REPO_ROOT / ".deploy"
WORKDIR_STAMP = ".fedgan-deploy"  # marks (and locks) a work folder of ours


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
    # Every process below us stays in our tree, even one whose parent exits first.
    adopt_orphans()

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
    finally:
        reap_orphans()
    if result.run_id is None:
        print("fedgan deploy: the run did not start (see the messages above)",
              file=sys.stderr)
        return 1
    print(f"fedgan deploy: run {result.run_id} {result.status}", file=sys.stderr)
    return 0 if result.completed else 1


if __name__ == "__main__":
    raise SystemExit(main())
