"""The run folder: the names users find on disk, and the readers every view uses."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fedgan_app.outputs.runfolder import (
    ROUND_KEY,
    RunFolder,
    csv_rounds,
    newest_sample,
    read_json,
    read_round_rows,
    read_rows,
    read_table,
    sample_name,
)


def test_the_names_are_the_documented_run_folder() -> None:
    # Prepare / Execute
    folder = RunFolder("/runs/r")

    # Assert: the names users and docs know (docs/architecture.md, docs/outputs.md)
    named = {
        folder.run_config_json: "run_config.json", folder.metrics_csv: "metrics.csv",
        folder.clients_csv: "clients.csv", folder.summary_json: "summary.json",
        folder.samples_dir: "samples", folder.plots_dir: "plots",
        folder.progress_gif: "progress.gif", folder.federation_gif: "federation.gif",
        folder.dashboard_html: "dashboard.html", folder.dashboard_json: "dashboard.json",
        folder.checkpoints_dir: "checkpoints", folder.latest_pt: "checkpoints/latest.pt",
        folder.best_pt: "checkpoints/best.pt", folder.run_lock: ".fedgan-run.lock",
        folder.wandb_dir: "wandb", folder.sample(7): "samples/round_0007.png",
        folder.sample(12, per_class=True): "samples/classes_round_0012.png",
        folder.plot("losses.png"): "plots/losses.png",
    }
    for path, name in named.items():
        assert path == Path("/runs/r") / name
    assert sample_name(12345) == "round_12345.png"


def test_sample_paths_are_by_round_and_kind(tmp_path: Path) -> None:
    # Prepare: grids of both kinds out of order, and files that are not grids
    folder = RunFolder(tmp_path)
    folder.samples_dir.mkdir()
    for name in ("round_0010.png", "round_0002.png", "classes_round_0002.png",
                 "round_0003.png.tmp", "round_x.png", "notes.txt"):
        (folder.samples_dir / name).write_bytes(b"")

    # Execute
    grids, per_class = folder.sample_paths(), folder.sample_paths(per_class=True)

    # Assert
    assert list(grids) == [2, 10] and grids[10] == folder.sample(10)
    assert per_class == {2: folder.sample(2, per_class=True)}
    assert newest_sample(tmp_path) == (10, folder.sample(10))
    assert newest_sample(tmp_path / "empty") == (None, None)


def test_the_readers_of_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: a metrics.csv with a row whose round is broken
    folder = RunFolder(tmp_path)
    folder.metrics_csv.write_text("round,loss-d\n1,0.5\nx,0.7\n3,\n")

    # Execute
    columns, rows = read_table(folder.metrics_csv)
    with caplog.at_level(logging.WARNING):
        views = folder.metrics_rows()

    # Assert: as written, and for the views with the round as an int
    assert columns == ["round", "loss-d"]
    assert rows == read_rows(folder.metrics_csv) == [
        {"round": "1", "loss-d": "0.5"}, {"round": "x", "loss-d": "0.7"},
        {"round": "3", "loss-d": ""}]
    assert [r[ROUND_KEY] for r in views] == [1, 3]
    assert "line 3: no integer 'round'" in caplog.text
    assert csv_rounds(folder.metrics_csv) == [1, 3]
    assert folder.clients_rows() == read_round_rows(folder.clients_csv) == []
    assert csv_rounds(folder.clients_csv) is None
    with pytest.raises(FileNotFoundError):
        read_rows(folder.clients_csv)


@pytest.mark.parametrize(("text", "says"), [
    ("", "is empty"), ("loss-d\n0.5\n", "has no header with a 'round' column")])
def test_csv_rounds_names_a_damaged_file(tmp_path: Path, text: str, says: str) -> None:
    # Prepare
    path = RunFolder(tmp_path).metrics_csv
    path.write_text(text)

    # Execute / Assert
    with pytest.raises(ValueError, match=says):
        csv_rounds(path)


def test_json_readers_give_an_empty_dict_for_a_missing_or_foreign_file(tmp_path: Path) -> None:
    # Prepare
    folder = RunFolder(tmp_path)
    folder.summary_json.write_text('{"best/fid": 12.5}')
    (tmp_path / "list.json").write_text("[1, 2]")

    # Execute / Assert
    assert folder.summary() == {"best/fid": 12.5}
    assert folder.config() == {}  # missing
    assert read_json(tmp_path / "list.json") == {}
    folder.run_config_json.write_text("{not json")
    assert folder.config() == {}
