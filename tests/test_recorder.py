"""The recorder: round numbers, one commit order, resume state, real files, one writer."""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from fedgan_app.config import RunConfig
from fedgan_app.files import RunLock
from fedgan_app.outputs.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedgan_app.outputs.recorder import Recorder, RunFolderInUse, run_folder
from fedgan_app.outputs.runfolder import RUN_LOCK, RunFolder, read_rows
from fedgan_app.settings import ConfigError
from tests.run_folder import RunFolderHolder

ARRAYS = ArrayRecord({"generator.w": torch.arange(3.0)})
GRID = np.zeros((10, 10, 3), dtype=np.uint8)


def _cfg(tmp_path: Path, **changes: object) -> RunConfig:
    return RunConfig.defaults(output_dir=str(tmp_path / "outputs"), run_name="run",
                              wandb_mode="disabled", num_server_rounds=6, **changes)


def _history(run_dir: Path, rounds: int) -> None:
    """metrics.csv as a run leaves it after `rounds` rounds (one row each)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    RunFolder(run_dir).metrics_csv.write_text(
        "round,loss-d\n" + "".join(f"{r},0.5\n" for r in range(1, rounds + 1)))


def _round(recorder: Recorder, local_round: int, fid: float | None = None,
           ema_state: dict[str, torch.Tensor] | None = None) -> dict:
    """One round as the strategy and the end of the round drive it."""
    server_round = recorder.absolute(local_round)
    recorder.record_train(server_round, {"replies-accepted": 2.0},
                          [{"node-id": 1, "status": "accepted"}],
                          {"strategy": "fedavgm", "momentum_vector/generator.w":
                           torch.full((3,), float(server_round))})
    recorder.record_samples(server_round, GRID)
    return recorder.commit(server_round, ARRAYS, {} if fid is None else {"fid": fid},
                           ema_state=ema_state)


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
    clients_before_commit = read_rows(recorder.folder.clients_csv)
    recorder.record_evaluate(2, {"client-d-accuracy": 0.75})
    recorder.record_samples(2, GRID)
    second = recorder.commit(2, ARRAYS, {"fid": 60.0})
    recorder.finish()

    # Assert
    assert first["replies-accepted"] == 2.0 and first["round-time-s"] >= 0
    assert second["client-d-accuracy"] == 0.75
    assert [r["node-id"] for r in clients_before_commit] == ["1"]
    assert [(r["round"], r["node-id"]) for r in read_rows(
        recorder.folder.clients_csv)] == [("1", "1"), ("2", "9")]
    latest = load_checkpoint(recorder.folder.latest_pt)
    best = load_checkpoint(recorder.folder.best_pt)
    assert (latest.server_round, latest.best_round, latest.best_metric) == (2, 1, 50.0)
    assert best.server_round == 1
    assert latest.strategy_state == {}  # round 2 pushed an empty optimizer state
    assert torch.equal(best.strategy_state["momentum_vector/generator.w"],
                       torch.full((3,), 1.0))
    assert recorder.folder.progress_gif.is_file()


def test_a_resumed_run_numbers_rounds_after_the_checkpoint_and_keeps_its_state(
    tmp_path: Path,
) -> None:
    # Prepare: a run folder at round 4 with an EMA generator and optimizer state
    cfg = replace(_cfg(tmp_path), generator_ema=0.9)
    run_dir = run_folder(cfg, None)
    latest = RunFolder(run_dir).latest_pt
    ema = {"generator.w": torch.ones(3)}
    save_checkpoint(Checkpoint(state=ARRAYS.to_torch_state_dict(), server_round=4,
                               config={}, best_metric=10.0, best_round=3, ema_state=ema,
                               strategy_state={"strategy": "fedadam"}), latest)
    _history(run_dir, 4)
    resume = load_checkpoint(latest)

    # Execute: round 5 ends with the EMA state the end of the round hands over
    recorder = Recorder(cfg, run_folder(cfg, latest), resume, latest)
    recorder.open()
    numbers = (recorder.absolute(0), recorder.absolute(1), recorder.absolute(2))
    _round(recorder, 1, fid=20.0, ema_state={"generator.w": resume.ema_state["generator.w"] * 2})

    # Assert: round 5 is committed with that EMA state and the old best
    assert numbers == (4, 5, 6)
    after = load_checkpoint(latest)
    assert (after.server_round, after.best_round, after.best_metric) == (5, 3, 10.0)
    assert torch.equal(after.ema_state["generator.w"], 2 * ema["generator.w"])
    assert [r["round"] for r in read_rows(RunFolder(run_dir).metrics_csv)] == [
        "1", "2", "3", "4", "5"]


def test_the_row_is_committed_before_latest_and_latest_before_best(tmp_path: Path) -> None:
    # Prepare: best.pt cannot be written (a folder stands in its place)
    cfg = _cfg(tmp_path)
    recorder = Recorder(cfg, run_folder(cfg, None))
    recorder.open()
    recorder.folder.best_pt.mkdir(parents=True)

    # Execute
    with pytest.raises(OSError):
        _round(recorder, 1, fid=50.0)

    # Assert: the row and latest.pt hold round 1; the refresh, last, never ran
    assert [r["round"] for r in read_rows(recorder.folder.metrics_csv)] == ["1"]
    assert load_checkpoint(recorder.folder.latest_pt).server_round == 1
    assert not recorder.folder.progress_gif.exists()


def test_resume_rewrites_a_best_checkpoint_left_behind_by_a_crash(tmp_path: Path) -> None:
    # Prepare: latest.pt says round 3 was the best, best.pt still holds round 2
    # (the server died between the two writes)
    cfg = _cfg(tmp_path)
    folder = RunFolder(run_folder(cfg, None))
    for server_round in (2, 3):
        save_checkpoint(Checkpoint(state=ARRAYS.to_torch_state_dict(),
                                   server_round=server_round, config={},
                                   best_metric=float(10 - server_round),
                                   best_round=server_round),
                        folder.best_pt if server_round == 2 else folder.latest_pt)
    latest = folder.latest_pt
    _history(folder.path, 3)

    # Execute
    Recorder(cfg, run_folder(cfg, latest), load_checkpoint(latest), latest).open()

    # Assert
    assert load_checkpoint(folder.best_pt).server_round == 3


# --- a damaged history is refused, never rewritten --------------------------------


def _metrics_with(text: str) -> Any:
    """Write metrics.csv with `text` (bytes when given bytes)."""
    def write(run_dir: Path) -> None:
        path = RunFolder(run_dir).metrics_csv
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return write


@pytest.mark.parametrize(("damage", "says"), [
    (_metrics_with(""), "metrics.csv is empty"),
    (_metrics_with("round,loss-d\n"), "metrics.csv holds only its header"),
    (_metrics_with("round,loss-d\n1,0.5\n2,0.5\n"), "metrics.csv ends at round 2"),
    (_metrics_with("round,loss-d\n1,0.5\n2,0.5\n4,0.5\n"), "lacks the rows of rounds 3"),
    (_metrics_with(b"\0" * 40), "metrics.csv has no header"),  # what XFS may leave
    (lambda run_dir: RunFolder(run_dir).metrics_csv.unlink(), "metrics.csv is missing"),
    (lambda run_dir: RunFolder(run_dir).clients_csv.write_text(""), "clients.csv is empty"),
])
def test_resume_refuses_a_run_folder_whose_csvs_lost_rounds(
    tmp_path: Path, damage: Any, says: str
) -> None:
    # Prepare: a run folder at round 4 (latest.pt, four rows), then the damage a
    # power loss leaves (or a hand edit)
    cfg = _cfg(tmp_path)
    run_dir = run_folder(cfg, None)
    latest = RunFolder(run_dir).latest_pt
    save_checkpoint(Checkpoint(state=ARRAYS.to_torch_state_dict(), server_round=4,
                               config={}), latest)
    _history(run_dir, 4)
    RunFolder(run_dir).clients_csv.write_text("round,node-id\n1,7\n")
    damage(run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}

    # Execute
    recorder = Recorder(cfg, run_folder(cfg, latest), load_checkpoint(latest), latest)
    with pytest.raises(ConfigError) as info:
        recorder.open()

    # Assert: the error names the file and the way out; nothing was written; the
    # folder is not left locked
    assert says in str(info.value) and str(run_dir) in str(info.value)
    assert "holds round 4" in str(info.value) and "copy the checkpoint" in str(info.value)
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert after.pop(RUN_LOCK) == b""
    before.pop(RUN_LOCK, None)
    assert after == before
    RunLock(RunFolder(run_dir).run_lock).acquire()


def test_a_checkpoint_from_elsewhere_starts_a_new_folders_history(tmp_path: Path) -> None:
    # Prepare: a checkpoint of round 4 kept outside any run folder
    cfg = _cfg(tmp_path)
    kept = tmp_path / "kept" / "round4.pt"
    save_checkpoint(Checkpoint(state=ARRAYS.to_torch_state_dict(), server_round=4,
                               config={}), kept)

    # Execute
    recorder = Recorder(cfg, run_folder(cfg, kept), load_checkpoint(kept), kept)
    recorder.open()
    _round(recorder, 1)
    recorder.finish()

    # Assert: a new run folder whose history starts after the checkpoint
    assert recorder.run_dir == tmp_path / "outputs" / "run"
    assert [r["round"] for r in read_rows(recorder.folder.metrics_csv)] == ["5"]


# --- one writer per run folder ------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_cannot_write_a_folder_another_process_writes(tmp_path: Path) -> None:
    # Prepare: another process runs in outputs/run (same output-dir and run-name)
    cfg = _cfg(tmp_path)
    folder = RunFolder(tmp_path / "outputs" / "run")
    with RunFolderHolder(tmp_path / "outputs", "run") as holder:
        rows_before = folder.run_config_json.read_bytes()

        # Execute: this run picks the same folder, and opens it anyway
        with pytest.raises(RunFolderInUse) as picked:
            run_folder(cfg, None)
        recorder = Recorder(cfg, tmp_path / "outputs" / "run")
        with pytest.raises(RunFolderInUse) as opened:
            recorder.open()
        # Assert: both name the folder and the process holding it; nothing written
        for error in (picked.value, opened.value):
            assert str(tmp_path / "outputs" / "run") in str(error)
            assert f"pid {holder.pid} on host {socket.gethostname()}" in str(error)
        assert folder.run_config_json.read_bytes() == rows_before
        assert recorder.outputs == []

        # Execute: the holder dies without finishing (SIGKILL): the kernel frees the lock
        holder.kill()
    recorder.open()
    recorder.finish()

    # Assert
    assert recorder.folder.summary_json.is_file()


def test_finish_unlocks_the_folder_for_the_next_run(tmp_path: Path) -> None:
    # Prepare: a run that finishes (flock locks belong to an open file, so a second
    # open of the lock file conflicts within one process too)
    cfg = _cfg(tmp_path)
    first = Recorder(cfg, run_folder(cfg, None))
    first.open()
    with pytest.raises(RunFolderInUse, match=f"pid {os.getpid()} "):
        Recorder(cfg, first.run_dir).open()

    # Execute
    first.finish()
    second = Recorder(cfg, run_folder(cfg, None))
    second.open()
    second.finish()

    # Assert: the lock file stays (removing it would race), with no holder named
    assert first.folder.run_lock.read_bytes() == b""
