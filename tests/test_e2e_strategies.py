"""Every strategy end to end through `flwr run`, tiny configs.

Each run trains 1 round of 1 local step on 3 nodes (krum, multikrum and bulyan
need 2f+3 and 4f+3 replies: 3 with f=0) and must complete with every reply
validated exactly once: `replies-validated` equals the number of nodes, and
clients.csv holds one accepted row per node.

The runs go through Flower's Deployment Engine (`deploy.launch.Deployment`: a
SuperLink and 3 SuperNodes as processes on loopback, TLS and SuperNode
authentication), one after another on the same federation: a run there costs a
ServerApp and a ClientApp process per node, while a simulation run would start
a Ray cluster each time. Every strategy also runs in process
(`InProcessGrid`: the same strategy, validation and recorder code).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.credentials import generate_credentials
from deploy.launch import Deployment
from fedgan_app import client_app as client_module
from fedgan_app import server_app as server_module
from fedgan_app.checkpoint import load_checkpoint
from fedgan_app.config import STRATEGIES
from fedgan_app.inprocess import InProcessGrid, server_context

NODES = 3  # krum, multikrum (2f+3) and bulyan (4f+3) with f = 0
# Server-optimizer state each strategy checkpoints (the others keep none).
STATE_SLOTS = {"fedavgm": {"momentum_vector"}, "fedadam": {"m_t", "v_t"},
               "fedadagrad": {"m_t", "v_t"}, "fedyogi": {"m_t", "v_t"}}


def _settings(name: str) -> dict:
    """The tiny run of one strategy."""
    return {"strategy": name, "num-malicious-clients": 0, "num-server-rounds": 1,
            "local-steps": 1, "batch-size": 8, "eval-samples": 10,
            "fraction-evaluate": 0.0, "wandb-mode": "disabled", "run-name": name}


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Run every strategy once on one deployment; strategy -> (status, run folder)."""
    work = tmp_path_factory.mktemp("deployment")
    out = tmp_path_factory.mktemp("outputs")
    credentials = generate_credentials(tmp_path_factory.mktemp("credentials"), NODES)
    results: dict[str, tuple[str, Path]] = {}
    with Deployment(work, credentials) as deployment:
        deployment.start_superlink()
        node_ids = deployment.register([credentials.node_public_key(i) for i in range(NODES)])
        nodes = [deployment.start_supernode(i, NODES) for i in range(NODES)]
        deployment.wait_online(node_ids, nodes)
        for name in STRATEGIES:
            config = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                              for k, v in {**_settings(name), "output-dir": str(out)}.items())
            result = deployment.run_app([config], timeout=300)
            results[name] = (result.status, out / name, result.output)
        yield results
        deployment.stop()
        assert deployment.processes() == [], "processes of the deployment left running"


@pytest.mark.e2e
@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_runs_through_flwr_run_and_validates_each_reply_once(
    name: str, finished_runs: dict
) -> None:
    # Prepare / Execute: the shared runs above
    status, run_dir, output = finished_runs[name]

    # Assert: completed; each reply validated once, accepted, weighted
    assert status == "finished:completed", output[-3000:]
    _assert_one_round(name, run_dir, NODES)


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_runs_in_process_and_validates_each_reply_once(
    name: str, tmp_path: Path
) -> None:
    # Prepare: the real ServerApp and ClientApps behind an in-process grid
    config = {**_settings(name), "output-dir": str(tmp_path)}
    grid = InProcessGrid(client_module.app, num_nodes=NODES, run_config=config)

    # Execute
    server_module.main(grid, server_context(config))

    # Assert: each reply validated once, accepted, weighted; the rule's state kept
    _assert_one_round(name, tmp_path / name, NODES)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _assert_one_round(name: str, run_dir: Path, nodes: int) -> None:
    """One completed round: every reply validated once and accepted, state checkpointed."""
    (row,) = _read_csv(run_dir / "metrics.csv")
    assert float(row["replies-validated"]) == nodes
    assert float(row["replies-accepted"]) == nodes
    assert float(row["model-updated"]) == 1
    clients = _read_csv(run_dir / "clients.csv")
    assert sorted(r["partition-id"] for r in clients) == [str(i) for i in range(nodes)]
    assert {r["status"] for r in clients} == {"accepted"}
    assert sum(float(r["weight"]) for r in clients) == pytest.approx(1.0)
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert checkpoint.server_round == 1 and checkpoint.config["strategy"] == name
    slots = {key.split("/")[0] for key in checkpoint.strategy_state} - {"strategy"}
    assert slots == STATE_SLOTS.get(name, set())
