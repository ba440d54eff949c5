"""Bring your own images: a folder and a labels CSV to parquet, then the default recipe on RGB."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fedgan_app.data.convert import main as convert_main
from fedgan_app.federation import client_app as client_module
from fedgan_app.outputs.runfolder import RunFolder
from fedgan_app.sample import sample_checkpoint
from fedgan_app.server_app import main as server_main
from harness.inprocess import InProcessGrid, server_context

SHAPES = ("circle", "square", "triangle")
COLORS = ((230, 60, 40), (40, 170, 70), (50, 90, 220))
# Enough that the server split (a fifth) holds the 40 images the leakage audit needs.
PER_CLASS = 80


def _draw(shape: str, rng: np.random.Generator, side: int = 40) -> Image.Image:
    """One synthetic RGB image: a coloured shape at a random place and size on grey."""
    image = Image.new("RGB", (side, side), tuple(int(v) for v in rng.integers(0, 60, 3)))
    draw = ImageDraw.Draw(image)
    r = int(rng.integers(side // 6, side // 3))
    cx, cy = (int(v) for v in rng.integers(r, side - r, 2))
    color = COLORS[int(rng.integers(len(COLORS)))]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=color)
    else:
        draw.polygon(((cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)), fill=color)
    return image


def _write_folder(root: Path, per_class: int = PER_CLASS) -> tuple[Path, Path]:
    """A folder of synthetic shape images (in subfolders) and its labels CSV."""
    rng = np.random.default_rng(0)
    images_dir = root / "images"
    rows = []
    for shape in SHAPES:
        (images_dir / shape).mkdir(parents=True)
        for i in range(per_class):
            name = f"{shape}/{i:03d}.png"
            _draw(shape, rng).save(images_dir / name)
            rows.append((name, shape))
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label"])
        writer.writerows(rows)
    return images_dir, labels


@pytest.fixture(scope="module")
def shapes_parquet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 RGB 40x40 shape images converted to 32x32 in a parquet file."""
    root = tmp_path_factory.mktemp("shapes")
    images_dir, labels = _write_folder(root)
    out = root / "shapes.parquet"
    assert convert_main([str(images_dir), str(labels), str(out), "--size", "32"]) == 0
    return out


def test_convert_writes_the_images_and_sorted_class_names(
        shapes_parquet: Path, capsys: pytest.CaptureFixture) -> None:
    import datasets

    # Execute
    table = datasets.Dataset.from_parquet(str(shapes_parquet))

    # Assert: every image, RGB 32x32, the classes by name in sorted order
    assert len(table) == PER_CLASS * len(SHAPES)
    assert table.features["label"].names == sorted(SHAPES)
    first = table[0]["image"]
    assert first.mode == "RGB" and first.size == (32, 32)
    assert table[0]["label"] == sorted(SHAPES).index("circle")


@pytest.mark.slow
def test_the_default_recipe_runs_end_to_end_on_rgb_32(shapes_parquet: Path,
                                                      tmp_path: Path) -> None:
    # Prepare: every default setting but the budget (2 rounds of 3 steps) and the
    # sample counts
    run_config = {"dataset": str(shapes_parquet), "num-server-rounds": 2, "local-steps": 3,
                  "eval-samples": 60, "audit-samples": 60, "fraction-evaluate": 0.0,
                  "client-threads": 1, "output-dir": str(tmp_path / "outputs"),
                  "run-name": "shapes", "wandb-mode": "disabled"}
    grid = InProcessGrid(client_module.app, num_nodes=2, run_config=run_config)

    # Execute
    server_main(grid, server_context(run_config))

    # Assert: both rounds scored, colour grids of three class rows, an RGB
    # generator in the checkpoint, the audit on RGB images
    folder = RunFolder(tmp_path / "outputs" / "shapes")
    rows = folder.metrics_rows()
    assert [int(row["round"]) for row in rows] == [1, 2]
    assert np.isfinite(float(rows[-1]["fid"])) and float(rows[-1]["replies-accepted"]) == 2
    grid_image = np.asarray(Image.open(folder.sample(2)))
    assert grid_image.ndim == 3 and grid_image.shape[2] == 3
    class_grid = np.asarray(Image.open(folder.sample(2, per_class=True)))
    assert class_grid.shape[0] == 3 * 32 + 4 * 2  # three rows of 32 px, 2 px of padding
    samples = sample_checkpoint(folder.latest_pt, num=6)
    assert tuple(samples.images.shape) == (6, 3, 32, 32)
    summary = folder.summary()
    assert summary["audit/num-partitions"] == 2 and "audit/membership/auc" in summary


def test_convert_names_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Prepare: images of two sizes; a CSV without a label column; one that
    # points outside the folder
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    Image.new("RGB", (32, 32)).save(images_dir / "a.png")
    Image.new("RGB", (40, 40)).save(images_dir / "b.png")
    (tmp_path / "outside.png").write_bytes((images_dir / "a.png").read_bytes())
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("file,label\na.png,x\nb.png,y\n")
    no_label = tmp_path / "no_label.csv"
    no_label.write_text("file,class\na.png,x\n")
    escape = tmp_path / "escape.csv"
    escape.write_text("file,label\n../outside.png,x\n")
    out = tmp_path / "out.parquet"

    def run(*args: str) -> tuple[int, str]:
        code = convert_main([str(a) for a in args])
        return code, capsys.readouterr().err

    # Execute / Assert: exit 2 with the reason, and nothing written
    code, err = run(images_dir, mixed, out)
    assert code == 2 and "2 sizes" in err and "--size" in err
    code, err = run(images_dir, no_label, out)
    assert code == 2 and "needs the columns 'file' and 'label'" in err
    code, err = run(images_dir, escape, out)
    assert code == 2 and "'../outside.png' is not a file in" in err
    code, err = run(images_dir, mixed, out, "--size", "30")
    assert code == 2 and "multiple of 4" in err
    assert not out.exists()
    # With --size both fit
    code, _ = run(images_dir, mixed, out, "--size", "16")
    assert code == 0 and out.is_file()
