"""Seeded sampling end to end: two `flwr run`s with one seed train the same partitions.

The simulation engine draws new node ids for every run, so only sampling by
partition (the query round, then the seeded choice) makes the two runs agree.
Both runs go to one private SuperLink side by side, so their start-up overlaps.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedgan_app.federation.sampling import TRAIN_STREAM, partition_order
from fedgan_app.outputs.runfolder import read_rows
from harness.local_superlink import LocalFlower

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NODES, ROUNDS, SEED = 4, 2, 5
CONFIG = ("fraction-train=0.5 fraction-evaluate=0.0 num-server-rounds=2 local-steps=1 "
          f"batch-size=8 eval-samples=10 audit-samples=0 client-threads=1 seed={SEED} "
          "wandb-mode='disabled'")


@pytest.fixture(scope="module")
def run_folders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple]]:
    """Run the same config twice at once; name -> (status, run folder)."""
    flower = LocalFlower(tmp_path_factory.mktemp("flwr-home"))
    out = tmp_path_factory.mktemp("outputs")
    names = ("first", "second")
    try:
        # Any CLI call starts the local SuperLink; two first `flwr run`s would race
        # to start one each.
        assert flower.flwr("ls", timeout=120).returncode == 0
        # Each `flwr run --stream` returns when its run has ended: no status polling
        # (each `flwr ls` is a CLI process of its own).
        with ThreadPoolExecutor(len(names)) as pool:
            run_ids = dict(zip(names, pool.map(
                lambda name: flower.run_app(f"{CONFIG} output-dir='{out}' run-name='{name}'",
                                            nodes=NODES, cpus_per_client=2)[0],
                names), strict=True))
        listed = flower.flwr("ls", "--format", "json", timeout=60)
        status = {int(run["run-id"]): run["status"]
                  for run in json.loads(listed.stdout)["runs"]}
        yield {name: (status.get(run_id, "not listed"), out / name)
               for name, run_id in run_ids.items()}
    finally:
        flower.stop()
    assert flower.superlink_pids() == [], "SuperLink left running"


def _trained(run_dir: Path) -> dict[int, list[int]]:
    """Round -> the partitions whose replies were accepted, from clients.csv."""
    trained: dict[int, list[int]] = {}
    for row in read_rows(run_dir / "clients.csv"):
        assert row["status"] == "accepted", row
        trained.setdefault(int(row["round"]), []).append(int(row["partition-id"]))
    return {r: sorted(p) for r, p in trained.items()}


def test_two_runs_with_one_seed_train_the_same_partitions_every_round(
    run_folders: dict[str, tuple]
) -> None:
    # Prepare / Execute: the two runs above
    (status_1, first), (status_2, second) = run_folders["first"], run_folders["second"]

    # Assert: both completed; each round trained the same 2 of 4 partitions in both
    # runs, the ones the seeded order puts first
    assert (status_1, status_2) == ("finished:completed", "finished:completed")
    expected = {r: sorted(partition_order(SEED, r, TRAIN_STREAM, range(NODES))[:2])
                for r in range(1, ROUNDS + 1)}
    assert _trained(first) == _trained(second) == expected
    # Round 1 paid for the query, round 2 asked nobody
    for run_dir in (first, second):
        rows = read_rows(run_dir / "metrics.csv")
        assert float(rows[0]["time-query-s"]) > 0 and float(rows[1]["time-query-s"]) == 0
