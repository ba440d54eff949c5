"""Every strategy end to end: `flwr run` on one private SuperLink, tiny configs.

Each run trains 1 round of 1 local step on as few nodes as its rule needs
(krum, multikrum and bulyan need 2f+3 and 4f+3 replies: 3 nodes with f=0)
and must complete with every reply validated exactly once: `replies-validated`
equals the number of nodes, and clients.csv holds one accepted row per node.
The runs are submitted a few at a time to the shared SuperLink, which runs
them side by side, so their start-up costs overlap.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedgan_app.checkpoint import load_checkpoint
from fedgan_app.config import STRATEGIES
from tests.flwr_local import LocalFlower

pytestmark = pytest.mark.e2e

NODES = {"krum": 3, "multikrum": 3, "bulyan": 3}  # 2f+3 and 4f+3 with f = 0; else 2
SIDE_BY_SIDE = 2  # runs at once (3 on 2 busy cores timed out starting Ray: 30 s)
# Server-optimizer state each strategy checkpoints (the others keep none).
STATE_SLOTS = {"fedavgm": {"momentum_vector"}, "fedadam": {"m_t", "v_t"},
               "fedadagrad": {"m_t", "v_t"}, "fedyogi": {"m_t", "v_t"}}


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Run every strategy once; strategy -> (status, run folder, nodes)."""
    home = tmp_path_factory.mktemp("flwr-home")
    out = tmp_path_factory.mktemp("outputs")
    flower = LocalFlower(home)
    flower.env["OMP_NUM_THREADS"] = "1"
    pending = list(STRATEGIES)
    running: dict[str, int] = {}
    results: dict[str, tuple[str, Path, int]] = {}
    try:
        while pending or running:
            while pending and len(running) < SIDE_BY_SIDE:
                name = pending.pop(0)
                config = (f"strategy='{name}' num-malicious-clients=0 num-server-rounds=1 "
                          "local-steps=1 batch-size=8 eval-samples=10 fraction-evaluate=0.0 "
                          f"wandb-mode='disabled' output-dir='{out}' run-name='{name}'")
                running[name], _ = flower.run_app(config, nodes=NODES.get(name, 2),
                                                  stream=False, cpus_per_client=2)
            for name, run_id in list(running.items()):
                status = flower.status(run_id)
                if status.startswith("finished"):
                    results[name] = (status, out / name, NODES.get(name, 2))
                    del running[name]
            time.sleep(1)
        yield results
    finally:
        flower.stop()
    assert flower.superlink_pids() == [], "SuperLink left running"


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_runs_end_to_end_and_validates_each_reply_once(
    name: str, finished_runs: dict
) -> None:
    # Prepare / Execute: the shared runs above
    status, run_dir, nodes = finished_runs[name]

    # Assert: completed; each reply validated once, accepted, weighted
    assert status == "finished:completed", name
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
