"""Turn a folder of images and a labels CSV into the parquet file the app reads.

::

    python -m fedgan_app.data.convert IMAGES_DIR LABELS_CSV OUT.parquet [--size 32]

LABELS_CSV has a header row with the columns ``file`` (a path relative to
IMAGES_DIR) and ``label`` (a class name or number, any text). The classes are
the distinct labels, sorted (as numbers when every label is one), and become
the file's ``datasets.ClassLabel``; the images become its ``datasets.Image()``
column: grey when every image is grey, RGB otherwise. ``--size N`` crops each
image to its central square and resizes it to N x N (the app needs square
images with a side that is a multiple of 4, 8 to 64); without it the images
are kept as they are, and must already be so.

Then train on it: ``flwr run . --run-config "dataset='/abs/path/OUT.parquet'"``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedgan_app.data.spec import DataError

if TYPE_CHECKING:
    from PIL.Image import Image

MIN_SIZE, MAX_SIZE = 8, 64
FILE_COLUMN, LABEL_COLUMN = "file", "label"


def read_labels(labels_csv: Path, images_dir: Path) -> list[tuple[Path, str]]:
    """(image path, label text) of every row; a missing column or file is a DataError."""
    try:
        with open(labels_csv, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            if FILE_COLUMN not in columns or LABEL_COLUMN not in columns:
                raise DataError(f"{labels_csv} needs the columns {FILE_COLUMN!r} and "
                                f"{LABEL_COLUMN!r} in its header row, found {columns}")
            rows = [(row[FILE_COLUMN] or "", (row[LABEL_COLUMN] or "").strip())
                    for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {labels_csv}: {exc}") from exc
    if not rows:
        raise DataError(f"{labels_csv} lists no images")
    root = images_dir.resolve()
    found = []
    for line, (name, label) in enumerate(rows, start=2):
        path = (images_dir / name).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise DataError(f"{labels_csv} line {line}: {name!r} is not a file in {images_dir}")
        if not label:
            raise DataError(f"{labels_csv} line {line}: empty label")
        found.append((path, label))
    return found


def class_names(labels: Sequence[str]) -> list[str]:
    """The distinct labels, sorted as numbers when every one is an integer, else as text."""
    distinct = set(labels)
    if all(label.lstrip("-").isdigit() for label in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def load_image(path: Path, size: int | None) -> Image:
    """Open an image as grey ('L') or RGB; with `size`, its central square resized."""
    from PIL import Image as PILImage
    from PIL import ImageOps, UnidentifiedImageError

    try:
        with PILImage.open(path) as opened:
            image = opened.convert("L" if opened.mode in ("1", "L", "I;16", "I") else "RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: not an image ({exc})") from exc
    if size is not None:
        image = ImageOps.fit(image, (size, size), PILImage.Resampling.LANCZOS)
    return image


def convert(images_dir: Path, labels_csv: Path, out: Path, size: int | None = None) -> dict:
    """Write the parquet file; return what it holds (images, classes, image size, mode).

    Raises
    ------
    DataError
        For a missing column, file or label, an unreadable image, a size
        outside 8..64 or not a multiple of 4, or images of different sizes.

    """
    import datasets

    if size is not None and not (MIN_SIZE <= size <= MAX_SIZE and size % 4 == 0):
        raise DataError(f"--size must be a multiple of 4 from {MIN_SIZE} to {MAX_SIZE}, "
                        f"got {size}")
    rows = read_labels(labels_csv, images_dir)
    images = [load_image(path, size) for path, _ in rows]
    sizes = {image.size for image in images}
    if len(sizes) > 1:
        raise DataError(f"the images have {len(sizes)} sizes ({sorted(sizes)[:3]}...): "
                        "pass --size to make them one")
    grey = all(image.mode == "L" for image in images)
    images = [image if grey else image.convert("RGB") for image in images]
    names = class_names([label for _, label in rows])
    index = {name: i for i, name in enumerate(names)}
    table = datasets.Dataset.from_dict(
        {"image": images, "label": [index[label] for _, label in rows]},
        features=datasets.Features({"image": datasets.Image(),
                                    "label": datasets.ClassLabel(names=names)}),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    table.to_parquet(str(tmp))
    tmp.replace(out)
    return {"images": len(images), "classes": names, "size": sizes.pop(),
            "mode": "grey" if grey else "RGB"}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: convert; exit 2 with a message naming what is wrong."""
    parser = argparse.ArgumentParser(prog="python -m fedgan_app.data.convert",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("images_dir", type=Path, help="the folder of the images")
    parser.add_argument("labels_csv", type=Path, help="CSV with the columns file,label")
    parser.add_argument("out", type=Path, help="the parquet file to write")
    parser.add_argument("--size", type=int, default=None,
                        help="crop to the central square and resize to SIZE x SIZE")
    args = parser.parse_args(argv)
    try:
        info = convert(args.images_dir, args.labels_csv, args.out, args.size)
    except DataError as exc:
        print(f"fedgan convert: {exc}", file=sys.stderr)
        return 2
    width, height = info["size"]
    print(f"fedgan convert: {info['images']} {info['mode']} images of {width}x{height}, "
          f"{len(info['classes'])} classes {info['classes'][:10]} -> {args.out}")
    print(f"train on it: flwr run . --run-config \"dataset='{args.out.resolve()}'\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
