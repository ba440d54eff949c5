"""End to end: `flwr run . --stream` on a private local SuperLink, tiny config."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import imageio.v3 as iio
import pytest

from fedgan_app.outputs.checkpoint import load_checkpoint
from harness.local_superlink import LocalFlower

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def flower(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFlower]:
    """A private Flower home shared by the module's runs; its SuperLink is stopped after."""
    local = LocalFlower(tmp_path_factory.mktemp("flwr-home"))
    try:
        yield local
    finally:
        local.stop()
    assert local.superlink_pids() == [], "SuperLink left running"


def test_flwr_run_writes_every_output(flower: LocalFlower, tmp_path: Path) -> None:
    # Prepare: 2 nodes, 2 rounds, 3 local steps, W&B offline
    out = tmp_path / "outputs"
    run_config = (f"num-server-rounds=2 local-steps=3 batch-size=32 eval-every=2 "
                  f"eval-samples=200 audit-samples=200 fraction-evaluate=1.0 output-dir='{out}' "
                  f"run-name='e2e' wandb-mode='offline'")

    # Execute (cpus_per_client=2: one Ray actor trains both nodes, one torch import)
    run_id, output = flower.run_app(run_config, nodes=2, cpus_per_client=2)

    # Assert: the run completed (flwr run exits 0 even when it failed)
    assert flower.status(run_id) == "finished:completed", output[-3000:]
    run_dir = out / "e2e"
    assert json.loads((run_dir / "run_config.json").read_text())["num-server-rounds"] == 2
    for name in ("round_0000.png", "round_0001.png", "round_0002.png"):
        assert (run_dir / "samples" / name).is_file(), name
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["round"] for r in rows] == ["1", "2"]
    assert float(rows[-1]["fid"]) > 0 and float(rows[-1]["replies-accepted"]) == 2
    assert 0 <= float(rows[-1]["client-d-accuracy"]) <= 1  # the evaluate handler ran
    with open(run_dir / "clients.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 4  # 2 clients x 2 rounds
    assert iio.imread(run_dir / "progress.gif", index=None).shape[0] == 3
    assert (run_dir / "plots" / "losses.png").is_file()
    assert load_checkpoint(run_dir / "checkpoints" / "latest.pt").server_round == 2
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    offline_runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline_runs) == 1
    assert "round 2/2" in output  # the per-round summary line reaches the user
    # The leakage audit ran after the last round, on both partitions
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["audit/num-partitions"] == 2 and summary["audit/memorization/samples"] == 200
    assert 0 <= summary["audit/membership/auc"] <= 1
    assert "leakage audit: preference for training data" in output


def test_bad_setting_fails_the_run_before_training(flower: LocalFlower,
                                                   tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "outputs"

    # Execute
    run_id, output = flower.run_app(f"partitioner='random' output-dir='{out}'", nodes=2,
                                    cpus_per_client=2)

    # Assert: failed, with the key named, and nothing written
    assert flower.status(run_id) == "finished:failed"
    assert "'partitioner'" in output
    assert not out.exists()
