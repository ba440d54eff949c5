"""fedgan_app.outputs.tracking: real files in tmp_path and real offline W&B runs."""

from __future__ import annotations

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

from fedgan_app.outputs.runfolder import (
    LOSSES_PLOT,
    QUALITY_PLOT,
    RunFolder,
    read_rows,
    read_table,
)
from fedgan_app.outputs.tracking import LocalFiles, Output, WandbRun
from fedgan_app.outputs.views import refresh_run
from fedgan_app.quality.judge import make_grid
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


def _log_rounds(outputs: list[Output], rounds: range) -> None:
    """Per round, as the recorder does: metrics, 2 client rows, a grid, refresh."""
    for r in rounds:
        metrics: dict[str, float | int] = {
            "loss-d": 1.0 / r,
            "loss-g": 2.0 + r,
            "d-x": 0.6,
            "d-gz": 0.4,
        }
        if r == 2:
            metrics["fid"] = 123.5
        clients = [{"partition-id": pid, "num-examples": 100, "loss-d": 0.5,
                    "loss-g": 1.5, "converged": pid == 1} for pid in (0, 1)]
        for output in outputs:
            output.log_samples(r, _grid(r))
            output.log_round(r, metrics)
            output.log_clients(r, clients)
            output.refresh()


def _finish(outputs: list[Output]) -> None:
    for output in outputs:
        output.finish()


def _offline_runs(run_dir: Path) -> list[Path]:
    """Return the offline W&B run folders that hold a .wandb file."""
    return [d for d in RunFolder(run_dir).wandb_dir.glob("offline-run-*")
            if list(d.glob("*.wandb"))]


def _gif_frames(run_dir: Path) -> int:
    return iio.imread(RunFolder(run_dir).progress_gif, index=None).shape[0]


def test_full_run_writes_all_outputs(tmp_path: Path) -> None:
    """Three rounds then finish: config, CSVs, samples, GIF, plots, W&B run."""
    # Prepare
    run_dir = tmp_path / "run"
    local = LocalFiles(run_dir, CONFIG)
    wandb_run = WandbRun(run_dir, CONFIG, mode="offline", run_name="test")

    # Execute
    _log_rounds([local, wandb_run], range(1, 4))
    for output in (local, wandb_run):
        output.log_summary({"best-fid": 123.5})
    _finish([local, wandb_run])
    _finish([local, wandb_run])  # a second call is a no-op

    # Assert
    assert json.loads(RunFolder(run_dir).run_config_json.read_text()) == CONFIG
    header, rows = read_table(RunFolder(run_dir).metrics_csv)
    assert header == ["round", "loss-d", "loss-g", "d-x", "d-gz", "fid"]
    assert [row["round"] for row in rows] == ["1", "2", "3"]
    assert [row["fid"] for row in rows] == ["", "123.5", ""]
    assert float(rows[2]["loss-d"]) == 1.0 / 3  # repr round-trips floats exactly
    header, rows = read_table(RunFolder(run_dir).clients_csv)
    assert header[0] == "round"
    assert len(rows) == 6
    assert [row["converged"] for row in rows[:2]] == ["0", "1"]
    sample = iio.imread(RunFolder(run_dir).sample(1))
    assert sample.shape == (122, 122, 3)
    assert _gif_frames(run_dir) == 3
    assert RunFolder(run_dir).plot(LOSSES_PLOT).stat().st_size > 0
    assert RunFolder(run_dir).plot(QUALITY_PLOT).stat().st_size > 0
    assert json.loads(RunFolder(run_dir).summary_json.read_text()) == {"best-fid": 123.5}
    assert wandb_run.run_id is not None
    assert len(_offline_runs(run_dir)) == 1
    assert not list(run_dir.rglob(".*.tmp*"))  # no temp files left behind


def test_refresh_rebuilds_gif_and_plots_every_round_and_skips_unchanged_plots(
    tmp_path: Path,
) -> None:
    # Prepare
    run_dir = tmp_path / "run"
    local = LocalFiles(run_dir, CONFIG)
    frames, quality_bytes = [], []

    # Execute: round by round, as the recorder calls it
    for r in range(1, 5):
        _log_rounds([local], range(r, r + 1))
        frames.append(_gif_frames(run_dir))
        quality = RunFolder(run_dir).plot(QUALITY_PLOT)
        quality_bytes.append(quality.read_bytes() if quality.exists() else None)

    # Assert: the GIF grows by a frame a round; quality.png appears with the first
    # fid (round 2) and is not redrawn while no new fid comes
    assert frames == [1, 2, 3, 4]
    assert quality_bytes[0] is None and quality_bytes[1] is not None
    assert quality_bytes[1] == quality_bytes[2] == quality_bytes[3]
    losses = RunFolder(run_dir).plot(LOSSES_PLOT)
    before = losses.read_bytes()
    refresh_run(run_dir)
    assert losses.read_bytes() == before  # same data, same file


def test_animations_are_redrawn_on_their_time_budget_and_always_at_the_finish(
    tmp_path: Path,
) -> None:
    # Prepare: a budget so small that no round comes after a redraw's wait
    run_dir = tmp_path / "run"
    local = LocalFiles(run_dir, CONFIG, animation_share=1e-6)
    frames, pages = [], []

    # Execute: three rounds, as the recorder calls them, then the finish
    for r in range(1, 4):
        _log_rounds([local], range(r, r + 1))
        frames.append(_gif_frames(run_dir))
        pages.append(f'data-round="{r}"' in RunFolder(run_dir).dashboard_html.read_text())
    local.finish()

    # Assert: the first refresh draws the animations, the next two are not due; the
    # page follows every round; the finish draws every round
    assert frames == [1, 1, 1]
    assert pages == [True, True, True]
    assert _gif_frames(run_dir) == 3


def test_disabled_mode_writes_local_outputs_without_wandb(tmp_path: Path) -> None:
    """Local files alone: every file, no wandb/ folder, wandb never imported."""
    # Prepare
    run_dir = tmp_path / "run"
    script = f"""
import sys
from pathlib import Path
import numpy as np
from fedgan_app.outputs.tracking import LocalFiles
local = LocalFiles(Path({str(run_dir)!r}), {{"a": 1}})
local.log_round(1, {{"loss-d": 0.5, "loss-g": 1.0}})
local.log_clients(1, [{{"partition-id": 0, "loss-d": 0.5}}])
local.log_samples(1, np.zeros((22, 42, 3), dtype=np.uint8))
local.log_summary({{"x": 1}})
local.finish()
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
    folder = RunFolder(run_dir)
    for path in (folder.run_config_json, folder.metrics_csv, folder.clients_csv,
                 folder.summary_json, folder.progress_gif, folder.sample(1),
                 folder.plot(LOSSES_PLOT)):
        assert path.exists(), path
    assert not folder.wandb_dir.exists()


def test_resume_drops_later_rows_and_reuses_wandb_run(tmp_path: Path) -> None:
    """Resume after round 2 of 4: rounds 3-4 dropped, re-logged once, same W&B id."""
    # Prepare
    run_dir = tmp_path / "run"
    first = [LocalFiles(run_dir, CONFIG), WandbRun(run_dir, CONFIG)]
    _log_rounds(first, range(1, 5))
    _finish(first)
    run_id = first[1].run_id

    # Execute
    second = [LocalFiles(run_dir, CONFIG, resume_after_round=2),
              WandbRun(run_dir, CONFIG, run_id=run_id)]
    rows_at_resume = read_rows(RunFolder(run_dir).metrics_csv)
    pngs_at_resume = sorted(p.name for p in RunFolder(run_dir).samples_dir.glob("*.png"))
    _log_rounds(second, range(3, 5))
    _finish(second)

    # Assert
    assert [row["round"] for row in rows_at_resume] == ["1", "2"]
    assert pngs_at_resume == ["round_0001.png", "round_0002.png"]
    header, rows = read_table(RunFolder(run_dir).metrics_csv)
    assert [row["round"] for row in rows] == ["1", "2", "3", "4"]
    assert "fid" in header
    client_rows = read_rows(RunFolder(run_dir).clients_csv)
    assert [row["round"] for row in client_rows] == ["1", "1", "2", "2", "3", "3", "4", "4"]
    assert _gif_frames(run_dir) == 4
    assert second[1].run_id == run_id
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
    outputs = [LocalFiles(run_dir, CONFIG), WandbRun(run_dir, CONFIG, run_id="bad/id")]
    _log_rounds(outputs, range(1, 4))
    for output in outputs:
        output.log_summary({"best-fid": 1.0})
    _finish(outputs)

    # Assert
    warnings = _wandb_warnings(caplog)
    assert len(warnings) == 1
    assert "W&B init failed" in warnings[0].getMessage()
    assert outputs[1].run_id is None
    assert len(read_rows(RunFolder(run_dir).metrics_csv)) == 3
    assert len(read_rows(RunFolder(run_dir).clients_csv)) == 6
    assert _gif_frames(run_dir) == 3
    assert RunFolder(run_dir).plot(LOSSES_PLOT).exists()


@pytest.mark.slow
def test_wandb_online_without_server_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Online, fake API key, no server: init times out, one warning, run goes on."""
    # Prepare
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)  # fake key: never a real account
    run_dir = tmp_path / "run"
    caplog.set_level(logging.WARNING, logger="flwr")

    # Execute
    outputs = [LocalFiles(run_dir, CONFIG),
               WandbRun(run_dir, CONFIG, mode="online", init_timeout_s=3)]
    _log_rounds(outputs, range(1, 2))
    _finish(outputs)

    # Assert
    warnings = _wandb_warnings(caplog)
    assert len(warnings) == 1
    assert outputs[1].run_id is None
    assert len(read_rows(RunFolder(run_dir).metrics_csv)) == 1


def test_wandb_failure_mid_run_warns_once_and_keeps_local_outputs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """W&B run ended under the output: next log fails, one warning, files go on."""
    # Prepare
    run_dir = tmp_path / "run"
    caplog.set_level(logging.WARNING, logger="flwr")
    outputs = [LocalFiles(run_dir, CONFIG), WandbRun(run_dir, CONFIG)]
    _log_rounds(outputs, range(1, 2))
    # End the output's run behind its back, so its next W&B call raises.
    outputs[1]._run.finish()

    # Execute
    _log_rounds(outputs, range(2, 4))
    for output in outputs:
        output.log_summary({"best-fid": 1.0})
    _finish(outputs)

    # Assert
    warnings = _wandb_warnings(caplog)
    assert len(warnings) == 1
    assert "W&B log" in warnings[0].getMessage()
    assert outputs[1].run_id is not None  # the run exists and can still be resumed
    assert len(read_rows(RunFolder(run_dir).metrics_csv)) == 3
    assert _gif_frames(run_dir) == 3


def _wandb_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The W&B warnings the outputs logged."""
    return [
        r for r in caplog.records if r.levelno == logging.WARNING and "W&B" in r.getMessage()
    ]


def _closed_run_records(run_dir: Path, timeout: float = 60.0) -> list[Any]:
    """The offline run's records once W&B has written its exit record (it writes late)."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(_wandb_records(run_dir))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, "W&B never closed the offline run file"
        time.sleep(0.2)


def test_wandb_offline_run_holds_the_animation_and_the_clients_table(tmp_path: Path) -> None:
    """The offline run holds the GIFs, every clients.csv row, the config and the summary."""
    # Prepare: contract rows (status, reason, weight, label histogram), one dropped
    run_dir = tmp_path / "run"
    outputs: list[Output] = [LocalFiles(run_dir, CONFIG),
                             WandbRun(run_dir, CONFIG, mode="offline", run_name="test")]
    reason = "norm: update norm 12.3 > 10 x median 1.1"
    for r in (1, 2):
        for output in outputs:
            output.log_clients(r, [
                {"node-id": 11, "partition-id": 0, "num-examples": 60, "wall-time-s": 1.5,
                 "status": "accepted", "reason": "", "weight": 1.0,
                 "label-histogram": "30;30"},
                {"node-id": 12, "partition-id": 1, "num-examples": 40, "wall-time-s": 2.5,
                 "status": "dropped", "reason": reason, "weight": 0.0,
                 "label-histogram": "0;40"},
            ])
            output.log_samples(r, _grid(r))
            output.log_round(r, {"loss-d": 1.0, "loss-g": 2.0})
    for output in outputs:
        output.log_summary({"best/fid": 42.5})

    # Execute
    _finish(outputs)

    # Assert: the GIFs as media files, byte for byte; the table with every row
    (run,) = _offline_runs(run_dir)
    media = run / "files" / "media"
    (federation,) = media.glob("videos/federation_*.gif")
    assert federation.read_bytes() == RunFolder(run_dir).federation_gif.read_bytes()
    (progress,) = media.glob("videos/samples/progress_*.gif")
    assert progress.read_bytes() == RunFolder(run_dir).progress_gif.read_bytes()
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
    csv_rows = read_rows(RunFolder(run_dir).clients_csv)
    assert table["columns"] == list(csv_rows[0])
    assert len(table["data"]) == 4
    status, why = table["columns"].index("status"), table["columns"].index("reason")
    assert [(row[status], row[why]) for row in table["data"]][:2] == [
        ("accepted", None), ("dropped", reason)]


def test_class_grids_are_written_logged_and_dropped_on_resume(tmp_path: Path) -> None:
    """The per-class grid: a file per round, a W&B image, later rounds dropped on resume."""
    # Prepare
    run_dir = tmp_path / "run"
    first: list[Output] = [LocalFiles(run_dir, CONFIG),
                           WandbRun(run_dir, CONFIG, mode="offline")]
    for r in (1, 2, 3):
        for output in first:
            output.log_round(r, {"loss-d": 1.0})
            output.log_class_samples(r, _grid(10 + r))
    _finish(first)

    # Execute
    second = LocalFiles(run_dir, CONFIG, resume_after_round=2)
    second.finish()

    # Assert
    names = sorted(p.name for p in RunFolder(run_dir).samples_dir.glob("classes_round_*.png"))
    assert names == ["classes_round_0001.png", "classes_round_0002.png"]
    assert np.array_equal(iio.imread(RunFolder(run_dir).sample(2, per_class=True)), _grid(12))
    logged = list(_offline_runs(run_dir)[0].glob("files/media/images/samples/classes_*.png"))
    assert len(logged) == 3
    with pytest.raises(ValueError, match="grid must be uint8"):
        second.log_class_samples(4, _grid(1).astype(np.float32))
