"""Tests for fedgan_app.sample on checkpoints of real, tiny in-process runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fedgan_app.federation import client_app as client_module
from fedgan_app.outputs.checkpoint import load_checkpoint
from fedgan_app.outputs.runfolder import RunFolder
from fedgan_app.quality.judge import make_grid
from fedgan_app.sample import main, sample_checkpoint
from fedgan_app.server_app import main as server_main
from harness.inprocess import InProcessGrid, server_context
from tests.test_checkpoint import Hostile, zip_bomb

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run(root: Path, **settings: Any) -> Path:
    """Run a tiny federation in process (2 nodes, 2 local steps); return its run folder."""
    run_config = {
        "num-server-rounds": 1,
        "local-steps": 2,
        "batch-size": 16,
        "fraction-evaluate": 0.0,
        "eval-samples": 100,
        "audit-samples": 0,
        "output-dir": str(root / "outputs"),
        "run-name": "run",
        "wandb-mode": "disabled",
        **settings,
    }
    grid = InProcessGrid(client_module.app, num_nodes=2, run_config=run_config)
    server_main(grid, server_context(run_config))
    return root / "outputs" / "run"


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unconditional run with an EMA generator: two rounds, so the EMA differs from G."""
    return _run(tmp_path_factory.mktemp("ema"), **{"num-server-rounds": 2,
                                                    "generator-ema": 0.5,
                                                    "conditional": False})


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One round of a conditional run without an EMA generator."""
    return _run(tmp_path_factory.mktemp("conditional"), conditional=True)


@pytest.fixture(scope="module")
def g_variants_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One round of a deeper G with conditional BatchNorm, class-aware, on skewed clients."""
    return _run(tmp_path_factory.mktemp("g-variants"), conditional=True,
                **{"g-conditioning": "batchnorm", "g-depth": 1, "class-aware": "on",
                   "partitioner": "pathological"})


def _png(path: Path) -> np.ndarray:
    """The pixels of a PNG file."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _latest(run_dir: Path) -> Path:
    """The run's latest checkpoint."""
    return RunFolder(run_dir).latest_pt


@pytest.mark.parametrize(("run", "grid"), [("ema_run", "round_0002.png"),
                                           ("conditional_run", "round_0001.png"),
                                           ("g_variants_run", "round_0001.png")])
def test_default_sample_is_the_grid_the_run_drew(
    run: str, grid: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """64 images with the run's seed: the run's own grid of that round, pixel for pixel."""
    # Prepare
    run_dir = request.getfixturevalue(run)
    out = tmp_path / "grid.png"

    # Execute
    code = main([str(_latest(run_dir)), "--out", str(out)])

    # Assert
    assert code == 0
    assert np.array_equal(_png(out), _png(RunFolder(run_dir).samples_dir / grid))


def test_num_and_seed_choose_the_images(ema_run: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """--num sets the grid's size, --seed draws other noise; the line says what was drawn."""
    # Prepare
    checkpoint = _latest(ema_run)
    out = tmp_path / "ten.png"

    # Execute
    code = main([str(checkpoint), "--num", "10", "--seed", "3", "--out", str(out)])
    drawn = sample_checkpoint(checkpoint, num=10, seed=3)

    # Assert
    assert code == 0
    assert "10 images from the ema generator of round 2" in capsys.readouterr().out
    assert np.array_equal(_png(out), make_grid(drawn.images))  # 8 columns, 2 rows
    assert drawn.images.shape == (10, 1, 28, 28) and drawn.labels is None
    run_grid = _png(RunFolder(ema_run).sample(2))
    assert not np.array_equal(_png(out)[:30], run_grid[:30])  # other noise, other digits


@pytest.mark.parametrize("run", ["conditional_run", "g_variants_run"])
def test_class_draws_every_image_of_that_class(run: str, request: pytest.FixtureRequest,
                                                tmp_path: Path) -> None:
    """--class C on a conditional run: all labels C; same noise, other class, other images."""
    # Prepare
    checkpoint = _latest(request.getfixturevalue(run))
    out = tmp_path / "threes.png"

    # Execute
    code = main([str(checkpoint), "--class", "3", "--num", "16", "--out", str(out)])
    threes = sample_checkpoint(checkpoint, num=16, class_id=3)
    fours = sample_checkpoint(checkpoint, num=16, class_id=4)

    # Assert
    assert code == 0
    assert np.array_equal(_png(out), make_grid(threes.images))
    assert threes.labels.tolist() == [3] * 16
    assert fours.labels.tolist() == [4] * 16
    assert not torch.equal(threes.images, fours.images)


def test_the_noise_scale_reaches_the_grids_the_scores_and_the_sample_command(
    conditional_run: Path, tmp_path: Path
) -> None:
    """sample-noise-scale 1.5: the same trained G as the plain run, drawn and scored wider."""
    # Prepare / Execute: the conditional run again, its samples drawn from N(0, 1.5^2)
    wide = _run(tmp_path, conditional=True, **{"sample-noise-scale": 1.5})
    out = tmp_path / "grid.png"
    code = main([str(_latest(wide)), "--out", str(out)])

    # Assert: training did not change, so every difference is the sampling noise's
    plain_ckpt, wide_ckpt = load_checkpoint(_latest(conditional_run)), load_checkpoint(
        _latest(wide))
    assert plain_ckpt.state.keys() == wide_ckpt.state.keys()
    assert all(torch.equal(plain_ckpt.state[k], wide_ckpt.state[k]) for k in plain_ckpt.state)
    plain_grid = _png(RunFolder(conditional_run).sample(1))
    wide_grid = _png(RunFolder(wide).sample(1))
    assert not np.array_equal(plain_grid, wide_grid)
    # the command draws what the run drew, with the run's own scale
    assert code == 0 and np.array_equal(_png(out), wide_grid)
    # the quality row scored the wider samples
    plain_row, wide_row = (RunFolder(conditional_run).metrics_rows()[-1],
                           RunFolder(wide).metrics_rows()[-1])
    assert float(plain_row["fid"]) != float(wide_row["fid"])


def test_ema_generator_by_default_and_raw_on_request(ema_run: Path) -> None:
    """The EMA generator is drawn unless --raw; after two rounds it draws other images."""
    # Prepare
    checkpoint = _latest(ema_run)
    saved = load_checkpoint(checkpoint)

    # Execute
    default = sample_checkpoint(checkpoint)
    ema = sample_checkpoint(checkpoint, ema=True)
    raw = sample_checkpoint(checkpoint, ema=False)

    # Assert
    assert saved.ema_state is not None
    assert any(not torch.equal(saved.ema_state[k], saved.state[k]) for k in saved.ema_state)
    assert (default.generator, ema.generator, raw.generator) == ("ema", "ema", "raw")
    assert torch.equal(default.images, ema.images)
    assert not torch.equal(default.images, raw.images)


@pytest.mark.parametrize(
    ("args", "says"),
    [(["--ema"], "holds no EMA generator"),
     (["--class", "3"], "conditional = false")],
)
def test_options_the_checkpoint_lacks_are_refused(
    ema_run: Path, conditional_run: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], args: list[str], says: str,
) -> None:
    """--ema without an EMA, --class without conditioning: exit 2 naming the file and why."""
    # Prepare: the conditional run has no EMA; the EMA run is unconditional
    checkpoint = _latest(conditional_run if args == ["--ema"] else ema_run)
    out = tmp_path / "grid.png"

    # Execute
    code = main([str(checkpoint), *args, "--out", str(out)])

    # Assert
    err = capsys.readouterr().err
    assert code == 2
    assert str(checkpoint) in err and says in err
    assert not out.exists()


def test_class_out_of_range_is_refused(conditional_run: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """--class 10 on a 10-class run names the classes it has."""
    # Execute
    code = main([str(_latest(conditional_run)), "--class", "10",
                 "--out", str(tmp_path / "grid.png")])

    # Assert
    assert code == 2
    assert "classes 0..9" in capsys.readouterr().err


def _truncated(run_dir: Path, tmp: Path) -> Path:
    """The first half of a real checkpoint."""
    path = tmp / "truncated.pt"
    data = _latest(run_dir).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _foreign(run_dir: Path, tmp: Path) -> Path:
    """A torch file that is not a fedgan checkpoint."""
    path = tmp / "foreign.pt"
    torch.save({"model": torch.zeros(3)}, path)
    return path


def _missing(run_dir: Path, tmp: Path) -> Path:
    """A path with no file."""
    return tmp / "nowhere" / "latest.pt"


@pytest.mark.parametrize(("make", "says"), [(_truncated, "cannot be read"),
                                            (_foreign, "not a fedgan checkpoint"),
                                            (_missing, "does not exist")])
def test_a_bad_file_is_named_without_a_traceback(
    conditional_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    make: Any, says: str,
) -> None:
    """Truncated, foreign or missing: exit 2, one line naming the file."""
    # Prepare
    path = make(conditional_run, tmp_path)
    out = tmp_path / "grid.png"

    # Execute
    code = main([str(path), "--out", str(out)])

    # Assert
    err = capsys.readouterr().err
    assert code == 2
    assert str(path) in err and says in err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_the_module_runs_as_a_command(conditional_run: Path, tmp_path: Path) -> None:
    """`python -m fedgan_app.sample` on a truncated file: exit 2, the file named, no traceback."""
    # Prepare
    truncated = _truncated(conditional_run, tmp_path)
    out = tmp_path / "grid.png"

    # Execute
    result = subprocess.run(
        [sys.executable, "-m", "fedgan_app.sample", str(truncated), "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})

    # Assert
    assert result.returncode == 2
    assert str(truncated) in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("make", ["bomb", "reduce"])
@pytest.mark.slow
def test_the_command_refuses_a_zip_bomb_and_a_code_payload_in_its_own_words(
    tmp_path: Path, make: str
) -> None:
    """A 0.3 MB file that inflates to 256 MiB, a pickle that would run code: exit 2 at once."""
    # Prepare
    if make == "bomb":
        path = zip_bomb(tmp_path / "bomb.pt")
    else:
        path = tmp_path / "reduce.pt"
        torch.save({"format": "fedgan-checkpoint", "x": Hostile(tmp_path / "pwned")}, path)
    out = tmp_path / "grid.png"

    # Execute
    result = subprocess.run(
        [sys.executable, "-m", "fedgan_app.sample", str(path), "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})

    # Assert: one line of ours naming the file and the reason, no torch advice
    assert result.returncode == 2
    assert result.stderr.startswith(f"fedgan sample: checkpoint {path} ")
    assert ("is compressed" if make == "bomb" else "does not hold only tensors") in result.stderr
    assert "weights_only" not in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / "pwned").exists()
