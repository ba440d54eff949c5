"""Tests for fedgan_app.tracking: real files in tmp_path and real offline W&B runs."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from fedgan_app.tracking import RunTracker, make_grid
from tests.test_faults import _wandb_history, _wandb_records

# Keep W&B's banner out of the test output.
os.environ.setdefault("WANDB_SILENT", "true")

CONFIG: dict[str, Any] = {
    "num-server-rounds": 3,
    "lr-g": 0.0002,
    "dataset": "mnist",
    "wandb-mode": "offline",
}
REPO_ROOT = Path(__file__).resolve().parents[1]


def _grid(server_round: int) -> np.ndarray:
    """Return a distinct grid per round (Pillow merges identical GIF frames)."""
    gen = torch.Generator().manual_seed(server_round)
    return make_grid(torch.rand((16, 1, 28, 28), generator=gen) * 2 - 1, nrow=4)


def _log_rounds(tracker: RunTracker, rounds: range) -> None:
    """Log metrics, 2 client rows and a grid per round; round 2 adds a column."""
    for r in rounds:
        metrics: dict[str, float | int] = {
            "loss-d": 1.0 / r,
            "loss-g": 2.0 + r,
            "d-x": 0.6,
            "d-gz": 0.4,
        }
        if r == 2:
            metrics["fid"] = 123.5
        tracker.log_round(r, metrics)
        tracker.log_clients(
            r,
            [
                {
                    "partition-id": pid,
                    "num-examples": 100,
                    "loss-d": 0.5,
                    "loss-g": 1.5,
                    "converged": pid == 1,
                }
                for pid in (0, 1)
            ],
        )
        tracker.log_samples(r, _grid(r))


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Return (header, rows) of a CSV file."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _offline_runs(run_dir: Path) -> list[Path]:
    """Return the offline W&B run folders that hold a .wandb file."""
    return [d for d in (run_dir / "wandb").glob("offline-run-*") if list(d.glob("*.wandb"))]


def test_make_grid_shape_dtype_and_range() -> None:
    """16 gray 28x28, nrow 4, padding 2 -> (122, 122, 3) uint8; -1 -> 0, 1 -> 255."""
    # Prepare
    images = torch.zeros((16, 1, 28, 28))
    images[0] = -1.0
    images[1] = 1.0

    # Execute
    grid = make_grid(images, nrow=4, padding=2)

    # Assert
    assert grid.shape == (4 * 30 + 2, 4 * 30 + 2, 3)
    assert grid.dtype == np.uint8
    assert (grid[2:30, 2:30] == 0).all()  # first tile: -1 -> 0
    assert (grid[2:30, 32:60] == 255).all()  # second tile: 1 -> 255
    assert (grid[2:30, 62:90] == 128).all()  # third tile: 0 -> mid gray
    assert (grid[0:2] == 0).all()  # padding is black


def test_full_run_writes_all_outputs(tmp_path: Path) -> None:
    """Three rounds then finish: config, CSVs, samples, GIF, plots, W&B run."""
    # Prepare
    run_dir = tmp_path / "run"
    tracker = RunTracker(run_dir, CONFIG, wandb_mode="offline", run_name="test")

    # Execute
    _log_rounds(tracker, range(1, 4))
    tracker.log_summary({"best-fid": 123.5})
    tracker.finish()
    tracker.finish()  # a second call is a no-op

    # Assert
    assert json.loads((run_dir / "run_config.json").read_text()) == CONFIG
    header, rows = _read_csv(run_dir / "metrics.csv")
    assert header == ["round", "loss-d", "loss-g", "d-x", "d-gz", "fid"]
    assert [row["round"] for row in rows] == ["1", "2", "3"]
    assert [row["fid"] for row in rows] == ["", "123.5", ""]
    assert float(rows[2]["loss-d"]) == 1.0 / 3  # repr round-trips floats exactly
    header, rows = _read_csv(run_dir / "clients.csv")
    assert header[0] == "round"
    assert len(rows) == 6
    assert [row["converged"] for row in rows[:2]] == ["0", "1"]
    sample = iio.imread(run_dir / "samples" / "round_0001.png")
    assert sample.shape == (122, 122, 3)
    assert iio.imread(run_dir / "progress.gif", index=None).shape[0] == 3
    assert (run_dir / "plots" / "losses.png").stat().st_size > 0
    assert (run_dir / "plots" / "quality.png").stat().st_size > 0
    assert json.loads((run_dir / "summary.json").read_text()) == {"best-fid": 123.5}
    assert tracker.wandb_run_id is not None
    assert len(_offline_runs(run_dir)) == 1
    assert not list(run_dir.rglob(".*.tmp*"))  # no temp files left behind


def test_disabled_mode_writes_local_outputs_without_wandb(tmp_path: Path) -> None:
    """Disabled: all local files, no wandb/ folder, wandb never imported."""
    # Prepare
    run_dir = tmp_path / "run"
    script = f"""
import sys
import time
from pathlib import Path
import torch
from fedgan_app.tracking import RunTracker, make_grid
from tests.test_faults import _wandb_history, _wandb_records
tracker = RunTracker(Path({str(run_dir)!r}), {{"a": 1}}, wandb_mode="disabled")
tracker.log_round(1, {{"loss-d": 0.5, "loss-g": 1.0}})
tracker.log_clients(1, [{{"partition-id": 0, "loss-d": 0.5}}])
tracker.log_samples(1, make_grid(torch.zeros((4, 3, 8, 8)), nrow=2))
tracker.log_summary({{"x": 1}})
tracker.finish()
assert tracker.wandb_run_id is None
sys.exit(3 if "wandb" in sys.modules else 0)
"""

    # Execute
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )

    # Assert
    assert result.returncode == 0, result.stderr[-2000:]
    for name in (
        "run_config.json",
        "metrics.csv",
        "clients.csv",
        "summary.json",
        "progress.gif",
    ):
        assert (run_dir / name).exists(), name
    assert (run_dir / "samples" / "round_0001.png").exists()
    assert (run_dir / "plots" / "losses.png").exists()
    assert not (run_dir / "wandb").exists()


def test_resume_drops_later_rows_and_reuses_wandb_run(tmp_path: Path) -> None:
    """Resume after round 2 of 4: rounds 3-4 dropped, re-logged once, same W&B id."""
    # Prepare
    run_dir = tmp_path / "run"
    first = RunTracker(run_dir, CONFIG, wandb_mode="offline")
    _log_rounds(first, range(1, 5))
    first.finish()

    # Execute
    second = RunTracker(
        run_dir,
        CONFIG,
        wandb_mode="offline",
        wandb_run_id=first.wandb_run_id,
        resume_after_round=2,
    )
    _, rows_at_resume = _read_csv(run_dir / "metrics.csv")
    _log_rounds(second, range(3, 5))
    second.finish()

    # Assert
    assert [row["round"] for row in rows_at_resume] == ["1", "2"]
    header, rows = _read_csv(run_dir / "metrics.csv")
    assert [row["round"] for row in rows] == ["1", "2", "3", "4"]
    assert "fid" in header
    _, client_rows = _read_csv(run_dir / "clients.csv")
    assert [row["round"] for row in client_rows] == [
        "1",
        "1",
        "2",
        "2",
        "3",
        "3",
        "4",
        "4",
    ]
    assert iio.imread(run_dir / "progress.gif", index=None).shape[0] == 4
    assert second.wandb_run_id == first.wandb_run_id
    # W&B writes one offline folder per session of the same run id.
    assert len(_offline_runs(run_dir)) == 2


def test_wandb_init_failure_warns_once_and_keeps_local_outputs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Real wandb.init failure (id with '/'): one warning, local files complete."""
    # Prepare
    run_dir = tmp_path / "run"
    caplog.set_level(logging.WARNING, logger="flwr")

    # Execute
    tracker = RunTracker(run_dir, CONFIG, wandb_mode="offline", wandb_run_id="bad/id")
    _log_rounds(tracker, range(1, 4))
    tracker.log_summary({"best-fid": 1.0})
    tracker.finish()

    # Assert
    warnings = _wandb_warnings(caplog)
    assert len(warnings) == 1
    assert "W&B init failed" in warnings[0].getMessage()
    assert tracker.wandb_run_id is None
    assert len(_read_csv(run_dir / "metrics.csv")[1]) == 3
    assert len(_read_csv(run_dir / "clients.csv")[1]) == 6
    assert iio.imread(run_dir / "progress.gif", index=None).shape[0] == 3
    assert (run_dir / "plots" / "losses.png").exists()


def test_wandb_online_without_server_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Online, fake API key, no server: init times out, one warning, run goes on."""
    # Prepare
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)  # fake key: never a real account
    run_dir = tmp_path / "run"
    caplog.set_level(logging.WARNING, logger="flwr")

    # Execute
    tracker = RunTracker(run_dir, CONFIG, wandb_mode="online", wandb_init_timeout_s=3)
    _log_rounds(tracker, range(1, 2))
    tracker.finish()

    # Assert
    warnings = _wandb_warnings(caplog)
    assert len(warnings) == 1
    assert tracker.wandb_run_id is None
    assert len(_read_csv(run_dir / "metrics.csv")[1]) == 1


def test_wandb_failure_mid_run_warns_once_and_keeps_local_outputs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """W&B run ended under the tracker: next log fails, one warning, files go on."""
    # Prepare
    run_dir = tmp_path / "run"
    caplog.set_level(logging.WARNING, logger="flwr")
    tracker = RunTracker(run_dir, CONFIG, wandb_mode="offline")
    _log_rounds(tracker, range(1, 2))
    # End the tracker's run behind its back, so its next W&B call raises.
    tracker._run.finish()

    # Execute
    _log_rounds(tracker, range(2, 4))
    tracker.log_summary({"best-fid": 1.0})
    tracker.finish()

    # Assert
    warnings = _wandb_warnings(caplog)
    assert len(warnings) == 1
    assert "W&B log failed" in warnings[0].getMessage()
    assert tracker.wandb_run_id is not None  # the run exists and can still be resumed
    assert len(_read_csv(run_dir / "metrics.csv")[1]) == 3
    assert iio.imread(run_dir / "progress.gif", index=None).shape[0] == 3


def test_log_event_counts_join_next_round_and_summary(tmp_path: Path) -> None:
    """Events count into the next metrics row; totals go to summary.json."""
    # Prepare
    tracker = RunTracker(tmp_path / "run", CONFIG, wandb_mode="disabled")

    # Execute
    tracker.log_event("dropped-replies")
    tracker.log_event("dropped-replies", 2)
    tracker.log_round(1, {"loss-d": 0.5})
    tracker.log_round(2, {"loss-d": 0.4})
    tracker.finish()

    # Assert
    _, rows = _read_csv(tmp_path / "run" / "metrics.csv")
    assert [row["dropped-replies"] for row in rows] == ["3", ""]
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == {
        "total-dropped-replies": 3
    }


def _closed_run_records(run_dir: Path, timeout: float = 60.0) -> list[Any]:
    """The offline run's records once W&B has written its exit record (it writes late)."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(_wandb_records(run_dir))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, "W&B never closed the offline run file"
        time.sleep(0.2)


def _wandb_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The W&B warnings the tracker logged."""
    return [
        r for r in caplog.records if r.levelno == logging.WARNING and "W&B" in r.getMessage()
    ]


def test_wandb_offline_run_holds_the_animation_and_the_clients_table(tmp_path: Path) -> None:
    """The offline run holds the GIFs, every clients.csv row, the config and the summary."""
    # Prepare: contract rows (status, reason, weight, label histogram), one dropped
    run_dir = tmp_path / "run"
    tracker = RunTracker(run_dir, CONFIG, wandb_mode="offline", run_name="test")
    reason = "norm: update norm 12.3 > 10 x median 1.1"
    for r in (1, 2):
        tracker.log_clients(r, [
            {"node-id": 11, "partition-id": 0, "num-examples": 60, "wall-time-s": 1.5,
             "status": "accepted", "reason": "", "weight": 1.0, "label-histogram": "30;30"},
            {"node-id": 12, "partition-id": 1, "num-examples": 40, "wall-time-s": 2.5,
             "status": "dropped", "reason": reason, "weight": 0.0, "label-histogram": "0;40"},
        ])
        tracker.log_samples(r, _grid(r))
        tracker.log_round(r, {"loss-d": 1.0, "loss-g": 2.0})

    tracker.log_summary({"best/fid": 42.5})

    # Execute
    tracker.finish()

    # Assert: the GIFs as media files, byte for byte; the table with every row
    (run,) = _offline_runs(run_dir)
    media = run / "files" / "media"
    (federation,) = media.glob("videos/federation_*.gif")
    assert federation.read_bytes() == (run_dir / "federation.gif").read_bytes()
    (progress,) = media.glob("videos/samples/progress_*.gif")
    assert progress.read_bytes() == (run_dir / "progress.gif").read_bytes()
    # ... and referenced by the run's own log, beside the config
    records = _closed_run_records(run_dir)
    rows = _wandb_history(run_dir)
    (media_row,) = [row for row in rows if "federation/_type" in row]
    assert media_row["federation/_type"] == "video-file"
    assert media_row["federation/path"] == federation.relative_to(run / "files").as_posix()
    assert any(row.get("clients/_type") == "table-file" for row in rows)
    config = {item.key: json.loads(item.value_json) for r in records
              if r.WhichOneof("record_type") == "run" for item in r.run.config.update}
    assert {k: config[k] for k in CONFIG} == CONFIG
    summary = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
               for r in records if r.WhichOneof("record_type") == "summary"
               for item in r.summary.update}
    assert summary["best/fid"] == 42.5
    (table_file,) = media.glob("table/clients_*.table.json")
    table = json.loads(table_file.read_text())
    _, csv_rows = _read_csv(run_dir / "clients.csv")
    assert table["columns"] == list(csv_rows[0])
    assert len(table["data"]) == 4
    status, why = table["columns"].index("status"), table["columns"].index("reason")
    assert [(row[status], row[why]) for row in table["data"]][:2] == [
        ("accepted", None), ("dropped", reason)]


def test_class_grids_are_written_logged_and_dropped_on_resume(tmp_path: Path) -> None:
    """The per-class grid hook: a file per round, a W&B image, later rounds dropped on resume."""
    # Prepare
    run_dir = tmp_path / "run"
    first = RunTracker(run_dir, CONFIG, wandb_mode="offline")
    for r in (1, 2, 3):
        first.log_round(r, {"loss-d": 1.0})
        first.log_class_samples(r, _grid(10 + r))
    first.finish()

    # Execute
    second = RunTracker(run_dir, CONFIG, wandb_mode="disabled", resume_after_round=2)
    second.finish()

    # Assert
    names = sorted(p.name for p in (run_dir / "samples").glob("classes_round_*.png"))
    assert names == ["classes_round_0001.png", "classes_round_0002.png"]
    assert np.array_equal(iio.imread(run_dir / "samples" / "classes_round_0002.png"), _grid(12))
    logged = list(_offline_runs(run_dir)[0].glob("files/media/images/samples/classes_*.png"))
    assert len(logged) == 3
    with pytest.raises(ValueError, match="grid must be uint8"):
        second.log_class_samples(4, _grid(1).astype(np.float32))
