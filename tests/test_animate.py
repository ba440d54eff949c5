"""fedgan_app.outputs.animation: GIFs drawn from real run folders (contract CSVs, a real run)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import pytest

from fedgan_app import server_app as server_module
from fedgan_app.federation import client_app as client_module
from fedgan_app.outputs import animation as animate
from fedgan_app.outputs import runview, views
from fedgan_app.outputs.animation import render_federation_gif
from fedgan_app.outputs.animation_figure import RoundFigure
from fedgan_app.outputs.animation_layout import (
    DIAGRAM_BOX,
    DROP_COLOR,
    FRAMES_PER_ROUND,
    PHASES,
)
from fedgan_app.outputs.runfolder import RunFolder
from fedgan_app.outputs.runview import load_run
from fedgan_app.outputs.tracking import LocalFiles
from harness.inprocess import InProcessGrid, server_context
from tests.run_folder import HISTOGRAMS, NORM_REASON, sample_grid, write_contract_run

UPLOAD = sum(n for phase, n in PHASES[: [p for p, _ in PHASES].index("upload")])


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    """Each test draws its frames itself (the cache is per process)."""
    animate.clear_cache()


def _frames(path: Path) -> np.ndarray:
    """All frames of a GIF as (N, H, W, 3)."""
    return iio.imread(path, index=None)[..., :3]


def _color_pixels(frame: np.ndarray, color: str, tolerance: int = 40) -> int:
    """Pixels inside the federation diagram within ``tolerance`` of ``color``."""
    height, width = frame.shape[:2]
    left, bottom, box_w, box_h = DIAGRAM_BOX
    top_px, bottom_px = int(height * (1 - bottom - box_h)), int(height * (1 - bottom))
    diagram = frame[top_px:bottom_px, int(width * left) : int(width * (left + box_w))]
    rgb = np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(diagram.astype(int) - rgb).max(axis=-1) <= tolerance).sum())


def _figure(run_dir: Path, server_round: int, phase: str, step: int = 0) -> RoundFigure:
    """The drawn figure of one round, showing one frame."""
    run = load_run(run_dir)
    figure = RoundFigure(run, next(v for v in run.rounds if v.server_round == server_round))
    figure.show(phase, step)
    return figure


def test_frame_count_follows_rounds_times_phases(tmp_path: Path) -> None:
    # Prepare
    one = write_contract_run(tmp_path / "one", rounds=1)
    three = write_contract_run(tmp_path / "three", rounds=3, dropped={2: 1}, failed={3: 2})

    # Execute
    gif_one = render_federation_gif(one)
    gif_three = render_federation_gif(three, out=tmp_path / "elsewhere" / "three.gif")

    # Assert
    assert gif_one == RunFolder(one).federation_gif
    assert len(_frames(gif_one)) == 1 * FRAMES_PER_ROUND
    assert gif_three == tmp_path / "elsewhere" / "three.gif"
    assert len(_frames(gif_three)) == 3 * FRAMES_PER_ROUND
    assert not RunFolder(three).federation_gif.exists()
    assert not list(tmp_path.rglob(".*.gif"))  # no temp file left behind


def test_long_run_keeps_at_most_max_rounds_with_the_last(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a cap of 3 rounds for a 5-round run
    monkeypatch.setattr(animate, "MAX_GIF_ROUNDS", 3)
    run_dir = write_contract_run(tmp_path / "run", rounds=5)

    # Execute
    picked = animate.gif_rounds(load_run(run_dir).rounds)
    frames = _frames(render_federation_gif(run_dir))

    # Assert
    assert [v.server_round for v in picked] == [1, 3, 5]
    assert len(frames) == 3 * FRAMES_PER_ROUND


def test_dropped_reply_shows_in_its_rounds_frames_only(tmp_path: Path) -> None:
    # Prepare: client 1's reply is dropped in round 2 of 3
    run_dir = write_contract_run(tmp_path / "run", rounds=3, dropped={2: 1})

    # Execute
    frames = _frames(render_federation_gif(run_dir))
    upload = _figure(run_dir, 2, "upload")
    clean = _figure(run_dir, 1, "upload")

    # Assert: the drop colour is in round 2's upload frame, nowhere in rounds 1 and 3
    per_round = frames.reshape(3, FRAMES_PER_ROUND, *frames.shape[1:])
    assert _color_pixels(per_round[1, UPLOAD], DROP_COLOR) > 100
    for server_round in (0, 2):
        assert all(_color_pixels(f, DROP_COLOR) == 0 for f in per_round[server_round])
    # and the reason is drawn, and no update arrow leaves the dropped client
    texts = " ".join(t.replace("\n", " ") for t in upload.visible_texts())
    assert f"dropped: {NORM_REASON}" in texts
    assert "dropped:p1" in upload.visible_marks()
    assert "update:p1" not in upload.visible_marks()
    assert not any(t.startswith("dropped:") for t in clean.visible_texts())


def test_failed_client_is_marked_in_every_frame_of_its_round(tmp_path: Path) -> None:
    # Prepare: node 103 (client 2) fails in round 2; its row has only the node id
    run_dir = write_contract_run(tmp_path / "run", rounds=2, failed={2: 2})

    # Execute
    run = load_run(run_dir)
    failed_round = RoundFigure(run, run.rounds[1])
    clean_round = RoundFigure(run, run.rounds[0])

    # Assert: mapped to its partition through its node id, crossed out, no update
    assert [r.client for r in run.rounds[1].replies if r.status == "failed"] == ["p2"]
    for phase, count in PHASES:
        for step in range(count):
            failed_round.show(phase, step)
            clean_round.show(phase, step)
            assert "failed:p2" in failed_round.visible_marks()
            assert "update:p2" not in failed_round.visible_marks()
            assert not any(m.startswith("failed:") for m in clean_round.visible_marks())
    assert any(t.startswith("failed: ClientAppException") for t in failed_round.visible_texts())
    assert "1 failed" in " ".join(failed_round.visible_texts())


def test_arrow_width_follows_weight_and_ring_follows_wall_time(tmp_path: Path) -> None:
    # Prepare: weights p_j from the contract column; wall times 2, 5, 8 s
    run_dir = write_contract_run(tmp_path / "run", rounds=1)
    sizes = {p: sum(h) for p, h in HISTOGRAMS.items()}

    # Execute
    upload = _figure(run_dir, 1, "upload")
    first_step = _figure(run_dir, 1, "train", 0)

    # Assert: linewidth = 0.8 + 9 p_j with p_j = n_j / sum n
    widths = {a.get_gid(): a.get_linewidth() for a in upload.fig.findobj(
        lambda a: str(a.get_gid()).startswith("update:"))}
    for p, n in sizes.items():
        assert widths[f"update:p{p}"] == pytest.approx(0.8 + 9 * n / sum(sizes.values()),
                                                       rel=1e-6)
    # after a quarter of the slowest client's 8 s: 2 s client done, 5 s at 40%, 8 s at 25%
    sweeps = {a.get_gid(): (a.theta2 - a.theta1) / 360 for a in first_step.fig.findobj(
        lambda a: str(a.get_gid()).startswith("pulse:") and a.get_visible())}
    assert sweeps == pytest.approx({"pulse:p0": 1.0, "pulse:p1": 0.4, "pulse:p2": 0.25})


def test_old_clients_csv_without_contract_columns_still_animates(tmp_path: Path) -> None:
    # Prepare: today's columns only (no status, weight, label-histogram)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with RunFolder(run_dir).clients_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["round", "node-id", "partition-id", "num-examples", "wall-time-s"])
        writer.writerows([[1, 7, 0, 300, 1.5], [1, 8, 1, 100, 3.0]])

    # Execute
    run = load_run(run_dir)
    frames = _frames(render_federation_gif(run_dir))

    # Assert: accepted, weighted by examples, unknown histograms (grey pies)
    assert [(r.client, r.status, r.weight) for r in run.rounds[0].replies] == [
        ("p0", "accepted", 0.75), ("p1", "accepted", 0.25)]
    assert all(c.histogram is None for c in run.clients)
    assert len(frames) == FRAMES_PER_ROUND


def test_cached_refresh_redraws_only_changed_rounds(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: count the rounds drawn
    run_dir = write_contract_run(tmp_path / "run", rounds=3, dropped={2: 1})
    drawn: list[int] = []

    class CountingFigure(RoundFigure):
        def __init__(self, run: Any, view: Any) -> None:
            drawn.append(view.server_round)
            super().__init__(run, view)

    monkeypatch.setattr(animate, "RoundFigure", CountingFigure)
    first = _frames(render_federation_gif(run_dir))

    # Execute: unchanged, then round 3's metrics row changes
    render_federation_gif(run_dir)
    after_nothing = list(drawn)
    text = RunFolder(run_dir).metrics_csv.read_text()
    RunFolder(run_dir).metrics_csv.write_text(text.replace(",197.0", ",150.0"))
    second = _frames(render_federation_gif(run_dir))
    animate.clear_cache()
    fresh = _frames(render_federation_gif(run_dir))

    # Assert
    assert after_nothing == [1, 2, 3]
    assert drawn[3:] == [3, 1, 2, 3]  # only round 3 redrawn; then all after clear_cache
    assert np.array_equal(second, fresh)  # cached frames are the frames drawn anew
    assert np.array_equal(first[: 2 * FRAMES_PER_ROUND], second[: 2 * FRAMES_PER_ROUND])
    assert not np.array_equal(first[-1], second[-1])


def test_resumed_run_folder_animates_every_round(tmp_path: Path) -> None:
    # Prepare: a tracker logs rounds 1-3 and crashes; a second resumes after round 2
    run_dir = tmp_path / "run"
    config = {"num-server-rounds": 4}
    first = LocalFiles(run_dir, config)
    for r in range(1, 4):
        _log_round(first, r)

    # Execute
    second = LocalFiles(run_dir, config, resume_after_round=2)
    for r in range(3, 5):
        _log_round(second, r)
    second.finish()

    # Assert: rounds 1-4 once each, drawn from the rows of both processes
    assert [v.server_round for v in load_run(run_dir).rounds] == [1, 2, 3, 4]
    assert len(_frames(RunFolder(run_dir).federation_gif)) == 4 * FRAMES_PER_ROUND


def test_cli_writes_the_gif_and_names_a_bad_folder(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    run_dir = write_contract_run(tmp_path / "run", rounds=2)
    (tmp_path / "empty").mkdir()

    # Execute
    ok = animate.main([str(run_dir), "--out", str(tmp_path / "x.gif")])
    ok_out = capsys.readouterr().out
    missing = animate.main([str(tmp_path / "nope")])
    missing_err = capsys.readouterr().err
    empty = animate.main([str(tmp_path / "empty")])
    empty_err = capsys.readouterr().err

    # Assert
    assert ok == 0 and ok_out.strip() == str(tmp_path / "x.gif")
    assert len(_frames(tmp_path / "x.gif")) == 2 * FRAMES_PER_ROUND
    assert missing == 2 and str(tmp_path / "nope") in missing_err
    assert empty == 2 and "neither metrics.csv nor clients.csv" in empty_err


@pytest.mark.slow
def test_real_run_refreshes_the_animation_every_round(tiny_run_config: dict,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the real ServerApp and ClientApp in process; node 102 fails in round 1;
    # record federation.gif's frame count after each per-round refresh
    run_dir = Path(tiny_run_config["output-dir"]) / "test-run"
    tiny_run_config["animation-share"] = 1.0  # redrawn after every round, not on a budget
    counts: list[int] = []
    real_refresh = views.refresh_run

    def counting_refresh(folder: Path, animations: bool = True) -> float:
        seconds = real_refresh(folder, animations)
        gif = RunFolder(folder).federation_gif
        counts.append(len(_frames(gif)) if gif.exists() else 0)
        return seconds

    monkeypatch.setattr(views, "refresh_run", counting_refresh)

    def fail(node_id: int, msg: Any) -> bool:
        return (node_id == 102 and msg.metadata.message_type == "train"
                and msg.content["config"]["server-round"] == 1)

    grid = InProcessGrid(client_module.app, num_nodes=2, run_config=tiny_run_config, fail=fail)

    # Execute
    server_module.main(grid, server_context(tiny_run_config))

    # Assert: none before round 1, one round more after each round, and the finish's
    # refresh draws the same two rounds
    assert counts == [0, FRAMES_PER_ROUND, 2 * FRAMES_PER_ROUND, 2 * FRAMES_PER_ROUND]
    assert len(_frames(RunFolder(run_dir).federation_gif)) == 2 * FRAMES_PER_ROUND
    run = load_run(run_dir)
    assert [v.server_round for v in run.rounds] == [1, 2]
    assert run.rounds[1].grid_after == RunFolder(run_dir).sample(2)
    figure = RoundFigure(run, run.rounds[0])
    figure.show("aggregate")
    assert "1 accepted, 0 dropped, 1 failed" in " ".join(figure.visible_texts())
    figure.show("upload")
    assert "update:p0" in figure.visible_marks()


def _log_round(tracker: LocalFiles, server_round: int) -> None:
    """One round's rows and grid through the tracker, as the server logs them."""
    tracker.log_clients(server_round, [
        {"node-id": 11, "partition-id": 0, "num-examples": 50, "wall-time-s": 1.0},
        {"node-id": 12, "partition-id": 1, "num-examples": 80, "wall-time-s": 2.0},
    ])
    tracker.log_samples(server_round, sample_grid(server_round))
    tracker.log_round(server_round, {"loss-d": 1.0, "loss-g": 2.0})


def test_large_federation_draws_each_rounds_own_clients_and_redraws_only_new_rounds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: more clients than the fixed layout holds (a cap of 2 for 3 clients);
    # rounds 1-2 drawn, then round 3 arrives with a client never seen before
    monkeypatch.setattr(runview, "MAX_FIXED_CLIENTS", 2)
    run_dir = write_contract_run(tmp_path / "run", rounds=3)
    clients_csv, metrics_csv = RunFolder(run_dir).clients_csv, RunFolder(run_dir).metrics_csv
    full_clients, full_metrics = clients_csv.read_text(), metrics_csv.read_text()
    clients_csv.write_text("".join(line for line in full_clients.splitlines(keepends=True)
                                   if not line.startswith("3,")))
    metrics_csv.write_text("".join(line for line in full_metrics.splitlines(keepends=True)
                                   if not line.startswith("3,")))
    render_federation_gif(run_dir)
    header, *rows = full_clients.splitlines(keepends=True)
    new_client = next(r for r in rows if r.startswith("3,")).split(",")
    new_client[1:3] = ["108", "7"]  # node 108 holds partition 7: new in round 3
    clients_csv.write_text(clients_csv.read_text() + ",".join(new_client))
    metrics_csv.write_text(full_metrics)
    drawn: list[int] = []
    real_figure = animate.RoundFigure

    def counting_figure(run: Any, view: Any) -> Any:
        drawn.append(view.server_round)
        return real_figure(run, view)

    monkeypatch.setattr(animate, "RoundFigure", counting_figure)

    # Execute
    frames = _frames(render_federation_gif(run_dir))
    round_3 = _figure(run_dir, 3, "train")
    round_1 = _figure(run_dir, 1, "train")

    # Assert: only the new round was drawn; each round shows its own clients
    assert drawn == [3]
    assert len(frames) == 3 * FRAMES_PER_ROUND
    assert {m for m in round_3.visible_marks() if m.startswith("pulse:")} == {"pulse:p7"}
    assert {m for m in round_1.visible_marks() if m.startswith("pulse:")} == {
        "pulse:p0", "pulse:p1", "pulse:p2"}
