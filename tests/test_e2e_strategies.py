"""Every strategy end to end, tiny configs: three through `flwr run`, the rest in process.

Each run trains 1 round of 1 local step on 3 nodes (krum, multikrum and bulyan
need 2f+3 and 4f+3 replies: 3 with f=0) and must complete with every reply
validated exactly once: `replies-validated` equals the number of nodes, and
clients.csv holds one accepted row per node.

`flwr run` takes one of each kind of rule (FedAvg; a server optimizer with
state to checkpoint, FedAdam; a robust rule, Bulyan); the others run the same
ServerApp and ClientApps on the in-process grid (harness.inprocess), which
skips only Flower's transport, already covered by the three.

The `flwr run` runs go to one private local SuperLink (simulation engine), two at a time:
a simulation run costs one ServerApp process and one Ray actor that trains all
three nodes, where a Deployment Engine run starts a ClientApp process (a torch
import) per node and round. Each run is its own `flwr run --stream`; one
`flwr ls` at the end reads every run's final status.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedgan_app.federation import client_app
from fedgan_app.outputs.checkpoint import load_checkpoint
from fedgan_app.outputs.runfolder import read_rows
from fedgan_app.server_app import main as server_main
from fedgan_app.settings import STRATEGIES
from harness.inprocess import InProcessGrid, server_context
from harness.local_superlink import LocalFlower

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NODES = 3  # krum, multikrum (2f+3) and bulyan (4f+3) with f = 0
THROUGH_FLWR_RUN = ("fedavg", "fedadam", "bulyan")
IN_PROCESS = tuple(name for name in STRATEGIES if name not in THROUGH_FLWR_RUN)
# Runs at once: their process start-ups overlap (more only queue for the same
# 2 cores, and a Ray start starved of CPU for 30 s fails).
SIDE_BY_SIDE = 2
# Server-optimizer state each strategy checkpoints (the others keep none).
STATE_SLOTS = {"fedavgm": {"momentum_vector"}, "fedadam": {"m_t", "v_t"},
               "fedadagrad": {"m_t", "v_t"}, "fedyogi": {"m_t", "v_t"}}


def _settings(name: str, out: Path) -> dict:
    """The tiny run of one strategy."""
    # One torch thread per client: the runs side by side already fill the cores.
    return {"strategy": name, "num-malicious-clients": 0, "num-server-rounds": 1,
            "local-steps": 1, "batch-size": 8, "eval-samples": 10, "audit-samples": 0,
            "fraction-evaluate": 0.0, "client-threads": 1, "wandb-mode": "disabled",
            "output-dir": str(out), "run-name": name}


def _run_config(name: str, out: Path) -> str:
    """The tiny run of one strategy, as a --run-config value."""
    return " ".join(f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"
                    for key, value in _settings(name, out).items())


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Run THROUGH_FLWR_RUN on one SuperLink; strategy -> (status, run folder, output)."""
    flower = LocalFlower(tmp_path_factory.mktemp("flwr-home"))
    out = tmp_path_factory.mktemp("outputs")
    try:
        # Any CLI call starts the local SuperLink; two first `flwr run`s would race
        # to start one each.
        assert flower.flwr("ls", timeout=120).returncode == 0
        # cpus_per_client=2: one Ray actor trains the 3 nodes (one torch import).
        with ThreadPoolExecutor(SIDE_BY_SIDE) as pool:
            started = dict(zip(THROUGH_FLWR_RUN, pool.map(
                lambda name: flower.run_app(_run_config(name, out), nodes=NODES,
                                            cpus_per_client=2, timeout=300),
                THROUGH_FLWR_RUN), strict=True))
        listed = flower.flwr("ls", "--format", "json", timeout=60)
        status = {int(run["run-id"]): run["status"]
                  for run in json.loads(listed.stdout)["runs"]}
        yield {name: (status.get(run_id, "not listed"), out / name, output)
               for name, (run_id, output) in started.items()}
    finally:
        flower.stop()
    assert flower.superlink_pids() == [], "SuperLink left running"


@pytest.mark.parametrize("name", THROUGH_FLWR_RUN)
def test_strategy_runs_through_flwr_run_and_validates_each_reply_once(
    name: str, finished_runs: dict
) -> None:
    # Prepare / Execute: the shared runs above
    status, run_dir, output = finished_runs[name]

    # Assert: completed, and the run folder as every strategy leaves it
    assert status == "finished:completed", output[-3000:]
    _assert_one_round_with_every_reply(name, run_dir)


@pytest.mark.parametrize("name", IN_PROCESS)
def test_strategy_runs_in_process_and_validates_each_reply_once(
        name: str, tmp_path: Path) -> None:
    # Prepare
    settings = _settings(name, tmp_path)
    grid = InProcessGrid(client_app.app, num_nodes=NODES, run_config=settings)

    # Execute
    server_main(grid, server_context(settings))

    # Assert
    _assert_one_round_with_every_reply(name, tmp_path / name)


def _assert_one_round_with_every_reply(name: str, run_dir: Path) -> None:
    """Each reply validated once, accepted and weighted; the rule's state checkpointed."""
    (row,) = read_rows(run_dir / "metrics.csv")
    assert float(row["replies-validated"]) == NODES
    assert float(row["replies-accepted"]) == NODES
    assert float(row["model-updated"]) == 1
    clients = read_rows(run_dir / "clients.csv")
    assert sorted(r["partition-id"] for r in clients) == [str(i) for i in range(NODES)]
    assert {r["status"] for r in clients} == {"accepted"}
    assert sum(float(r["weight"]) for r in clients) == pytest.approx(1.0)
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert checkpoint.server_round == 1 and checkpoint.config["strategy"] == name
    slots = {key.split("/")[0] for key in checkpoint.strategy_state} - {"strategy"}
    assert slots == STATE_SLOTS.get(name, set())
