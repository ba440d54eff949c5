"""The recorder: round numbers, one commit order, resume state, real files."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from fedgan_app.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedgan_app.config import RunConfig
from fedgan_app.recorder import Recorder, run_folder

ARRAYS = ArrayRecord({"generator.w": torch.arange(3.0)})
GRID = np.zeros((10, 10, 3), dtype=np.uint8)


def _cfg(tmp_path: Path, **changes: object) -> RunConfig:
    return RunConfig.defaults(output_dir=str(tmp_path / "outputs"), run_name="run",
                              wandb_mode="disabled", num_server_rounds=6, **changes)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _round(recorder: Recorder, local_round: int, fid: float | None = None) -> dict:
    """One round as the strategy and the evaluate callback drive it."""
    server_round = recorder.absolute(local_round)
    recorder.record_train(server_round, {"replies-accepted": 2.0},
                          [{"node-id": 1, "status": "accepted"}],
                          {"strategy": "fedavgm", "momentum_vector/generator.w":
                           torch.full((3,), float(server_round))})
    recorder.record_samples(server_round, GRID)
    return recorder.commit(server_round, ARRAYS, {} if fid is None else {"fid": fid})


def test_rounds_rows_and_checkpoints_of_a_fresh_run(tmp_path: Path) -> None:
    # Prepare
    cfg = _cfg(tmp_path)
    recorder = Recorder(cfg, run_folder(cfg, None))
    recorder.open()
    recorder.record_samples(0, GRID)

    # Execute: round 1 (fid 50, best), round 2 (fid 60); clients pushed but not
    # written until the round's commit
    first = _round(recorder, 1, fid=50.0)
    recorder.record_train(2, {"replies-accepted": 1.0}, [{"node-id": 9}], {})
    clients_before_commit = _read_csv(recorder.run_dir / "clients.csv")
    recorder.record_evaluate(2, {"client-d-accuracy": 0.75})
    recorder.record_samples(2, GRID)
    second = recorder.commit(2, ARRAYS, {"fid": 60.0})
    recorder.finish()

    # Assert
    assert first["replies-accepted"] == 2.0 and first["round-time-s"] >= 0
    assert second["client-d-accuracy"] == 0.75
    assert [r["node-id"] for r in clients_before_commit] == ["1"]
    assert [(r["round"], r["node-id"]) for r in _read_csv(
        recorder.run_dir / "clients.csv")] == [("1", "1"), ("2", "9")]
    latest = load_checkpoint(recorder.checkpoint_dir / "latest.pt")
    best = load_checkpoint(recorder.checkpoint_dir / "best.pt")
    assert (latest.server_round, latest.best_round, latest.best_metric) == (2, 1, 50.0)
    assert best.server_round == 1
    assert latest.strategy_state == {}  # round 2 pushed an empty optimizer state
    assert torch.equal(best.strategy_state["momentum_vector/generator.w"],
                       torch.full((3,), 1.0))
    assert (recorder.run_dir / "progress.gif").is_file()


def test_a_resumed_run_numbers_rounds_after_the_checkpoint_and_keeps_its_state(
    tmp_path: Path,
) -> None:
    # Prepare: a run folder at round 4 with an EMA generator and optimizer state
    cfg = replace(_cfg(tmp_path), generator_ema=0.9)
    run_dir = run_folder(cfg, None)
    latest = run_dir / "checkpoints" / "latest.pt"
    ema = {"generator.w": torch.ones(3)}
    save_checkpoint(Checkpoint(state=ARRAYS.to_torch_state_dict(), server_round=4,
                               config={}, best_metric=10.0, best_round=3, ema_state=ema,
                               strategy_state={"strategy": "fedadam"}), latest)
    resume = load_checkpoint(latest)

    # Execute
    recorder = Recorder(cfg, run_folder(cfg, latest), resume, latest)
    recorder.open()
    numbers = (recorder.absolute(0), recorder.absolute(1), recorder.absolute(2))
    _round(recorder, 1, fid=20.0)

    # Assert: round 5 is committed, keeps the EMA state and the old best
    assert numbers == (4, 5, 6)
    after = load_checkpoint(latest)
    assert (after.server_round, after.best_round, after.best_metric) == (5, 3, 10.0)
    assert torch.equal(after.ema_state["generator.w"], ema["generator.w"])
    assert [r["round"] for r in _read_csv(run_dir / "metrics.csv")] == ["5"]


def test_a_resumed_run_without_ema_drops_the_checkpoints_frozen_ema(tmp_path: Path) -> None:
    # Prepare: a checkpoint with an EMA generator; the resumed run has generator-ema 0
    cfg = _cfg(tmp_path)
    assert cfg.generator_ema == 0
    run_dir = run_folder(cfg, None)
    latest = run_dir / "checkpoints" / "latest.pt"
    save_checkpoint(Checkpoint(state=ARRAYS.to_torch_state_dict(), server_round=4,
                               config={}, ema_state={"generator.w": torch.ones(3)}), latest)

    # Execute
    recorder = Recorder(cfg, run_folder(cfg, latest), load_checkpoint(latest), latest)
    recorder.open()
    _round(recorder, 1, fid=20.0)

    # Assert: nothing samples the frozen EMA; the next checkpoint holds none
    assert recorder.ema_state is None
    assert load_checkpoint(latest).ema_state is None


def test_the_row_is_committed_before_latest_and_latest_before_best(tmp_path: Path) -> None:
    # Prepare: best.pt cannot be written (a folder stands in its place)
    cfg = _cfg(tmp_path)
    recorder = Recorder(cfg, run_folder(cfg, None))
    recorder.open()
    (recorder.checkpoint_dir / "best.pt").mkdir(parents=True)

    # Execute
    with pytest.raises(OSError):
        _round(recorder, 1, fid=50.0)

    # Assert: the row and latest.pt hold round 1; the refresh, last, never ran
    assert [r["round"] for r in _read_csv(recorder.run_dir / "metrics.csv")] == ["1"]
    assert load_checkpoint(recorder.checkpoint_dir / "latest.pt").server_round == 1
    assert not (recorder.run_dir / "progress.gif").exists()


def test_resume_rewrites_a_best_checkpoint_left_behind_by_a_crash(tmp_path: Path) -> None:
    # Prepare: latest.pt says round 3 was the best, best.pt still holds round 2
    # (the server died between the two writes)
    cfg = _cfg(tmp_path)
    checkpoints = run_folder(cfg, None) / "checkpoints"
    for server_round in (2, 3):
        save_checkpoint(Checkpoint(state=ARRAYS.to_torch_state_dict(),
                                   server_round=server_round, config={},
                                   best_metric=float(10 - server_round),
                                   best_round=server_round),
                        checkpoints / ("best.pt" if server_round == 2 else "latest.pt"))
    latest = checkpoints / "latest.pt"

    # Execute
    Recorder(cfg, run_folder(cfg, latest), load_checkpoint(latest), latest).open()

    # Assert
    assert load_checkpoint(checkpoints / "best.pt").server_round == 3
