"""The run folder: every file name it holds, and the readers of its files.

One run writes one folder, ``outputs/<run>/``::

    run_config.json                 the full config of the run
    metrics.csv                     one row per server round ("round" first)
    clients.csv                     one row per reply per round ("round" first)
    summary.json                    the reference row, the final and best values, times
    samples/round_NNNN.png          the fixed-noise sample grid of a round
    samples/classes_round_NNNN.png  one row per class (conditional runs)
    plots/losses.png, quality.png   the curves of metrics.csv
    progress.gif, federation.gif    the animations
    dashboard.html, dashboard.json  the live page and its version
    checkpoints/latest.pt, best.pt  the last round, the round of the lowest fid
    .fedgan-run.lock                held by the run writing the folder
    wandb/                          the W&B run (offline unless chosen online)

This module owns those names: writers (tracking, the recorder, the
checkpoints) and readers (the dashboard, the animation, the benchmarks, the
tests) take them from here, as `RunFolder` paths or the constants below.
It writes nothing.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Mapping
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.logger import log

RUN_CONFIG = "run_config.json"
METRICS_CSV = "metrics.csv"
CLIENTS_CSV = "clients.csv"
SUMMARY_JSON = "summary.json"
SAMPLES_DIR = "samples"
PLOTS_DIR = "plots"
LOSSES_PLOT = "losses.png"
QUALITY_PLOT = "quality.png"
PROGRESS_GIF = "progress.gif"
FEDERATION_GIF = "federation.gif"
DASHBOARD_PAGE = "dashboard.html"
DASHBOARD_STATE = "dashboard.json"
CHECKPOINTS_DIR = "checkpoints"
LATEST_CHECKPOINT = "latest.pt"
BEST_CHECKPOINT = "best.pt"
# Held by the run writing the folder; names its PID and host for a second writer.
RUN_LOCK = ".fedgan-run.lock"
WANDB_DIR = "wandb"
ROUND_KEY = "__round"  # a view's row: its round as int (read_round_rows)
_SAMPLE_RE = re.compile(r"^(classes_)?round_(\d+)\.png$")


def sample_name(server_round: int, per_class: bool = False) -> str:
    """The file name of a round's grid: round_NNNN.png or classes_round_NNNN.png."""
    return f"{'classes_' if per_class else ''}round_{server_round:04d}.png"


class RunFolder:
    """The paths of one run folder, and its readers.

    Parameters
    ----------
    path : Path
        The run folder (``outputs/<run>``); nothing is created.

    """

    def __init__(self, path: Path | str) -> None:
        """Name the folder; nothing is read or created."""
        self.path = Path(path)

    def __repr__(self) -> str:
        """RunFolder('<path>')."""
        return f"RunFolder({str(self.path)!r})"

    @property
    def run_config_json(self) -> Path:
        """run_config.json: the full config of the run."""
        return self.path / RUN_CONFIG

    @property
    def metrics_csv(self) -> Path:
        """metrics.csv: one row per server round."""
        return self.path / METRICS_CSV

    @property
    def clients_csv(self) -> Path:
        """clients.csv: one row per reply per round."""
        return self.path / CLIENTS_CSV

    @property
    def summary_json(self) -> Path:
        """summary.json: the run's summary values."""
        return self.path / SUMMARY_JSON

    @property
    def samples_dir(self) -> Path:
        """samples/: the grids of every round."""
        return self.path / SAMPLES_DIR

    @property
    def plots_dir(self) -> Path:
        """plots/: the curves of metrics.csv."""
        return self.path / PLOTS_DIR

    @property
    def progress_gif(self) -> Path:
        """progress.gif: the sample grids in round order."""
        return self.path / PROGRESS_GIF

    @property
    def federation_gif(self) -> Path:
        """federation.gif: the federation animation."""
        return self.path / FEDERATION_GIF

    @property
    def dashboard_html(self) -> Path:
        """dashboard.html: the live page."""
        return self.path / DASHBOARD_PAGE

    @property
    def dashboard_json(self) -> Path:
        """dashboard.json: the page's version, written after the page."""
        return self.path / DASHBOARD_STATE

    @property
    def checkpoints_dir(self) -> Path:
        """checkpoints/: latest.pt and best.pt."""
        return self.path / CHECKPOINTS_DIR

    @property
    def latest_pt(self) -> Path:
        """checkpoints/latest.pt: the last committed round."""
        return self.checkpoints_dir / LATEST_CHECKPOINT

    @property
    def best_pt(self) -> Path:
        """checkpoints/best.pt: the round of the lowest fid."""
        return self.checkpoints_dir / BEST_CHECKPOINT

    @property
    def run_lock(self) -> Path:
        """.fedgan-run.lock: held by the run writing the folder."""
        return self.path / RUN_LOCK

    @property
    def wandb_dir(self) -> Path:
        """wandb/: W&B's own folder."""
        return self.path / WANDB_DIR

    def plot(self, name: str) -> Path:
        """plots/<name>."""
        return self.plots_dir / name

    def sample(self, server_round: int, per_class: bool = False) -> Path:
        """samples/round_NNNN.png (or classes_round_NNNN.png) of a round."""
        return self.samples_dir / sample_name(server_round, per_class)

    def sample_paths(self, per_class: bool = False) -> dict[int, Path]:
        """Round -> grid file, in round order (the files on disk)."""
        return sample_paths(self.path, per_class)

    def config(self) -> dict[str, Any]:
        """run_config.json as a dict ({} when missing or unreadable)."""
        return read_json(self.run_config_json)

    def summary(self) -> dict[str, Any]:
        """summary.json as a dict ({} when missing or unreadable)."""
        return read_json(self.summary_json)

    def metrics_rows(self) -> list[dict[str, Any]]:
        """metrics.csv's rows with their round under ROUND_KEY ([] when missing)."""
        return read_round_rows(self.metrics_csv)

    def clients_rows(self) -> list[dict[str, Any]]:
        """clients.csv's rows with their round under ROUND_KEY ([] when missing)."""
        return read_round_rows(self.clients_csv)


def sample_paths(run_dir: Path, per_class: bool = False) -> dict[int, Path]:
    """Round -> samples/round_NNNN.png (or classes_round_NNNN.png) of a run folder."""
    found = {}
    for path in (Path(run_dir) / SAMPLES_DIR).glob("*round_*.png"):
        match = _SAMPLE_RE.match(path.name)
        if match is not None and bool(match.group(1)) == per_class:
            found[int(match.group(2))] = path
    return dict(sorted(found.items()))


def newest_sample(run_dir: Path, per_class: bool = False) -> tuple[int | None, Path | None]:
    """(round, path) of the newest grid of a run folder, or (None, None)."""
    found = sample_paths(run_dir, per_class)
    if not found:
        return None, None
    server_round = max(found)
    return server_round, found[server_round]


def read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a run CSV as written: every cell a string.

    Raises FileNotFoundError when the file is missing.
    """
    with Path(path).open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a run CSV as written (FileNotFoundError when missing)."""
    return read_table(path)[1]


def read_round_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a run CSV ([] when missing), each with its round as int under ROUND_KEY.

    A row without an integer 'round' is skipped with a warning naming the file and line.
    """
    if not Path(path).is_file():
        return []
    rows = []
    with Path(path).open(newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            server_round = number(row.get("round"))
            if server_round is None or server_round != int(server_round):
                log(WARNING, "%s line %d: no integer 'round'; row skipped", path, line)
                continue
            rows.append({**row, ROUND_KEY: int(server_round)})
    return rows


def csv_rounds(path: Path) -> list[int] | None:
    """The round of each row of a run CSV, in file order; None: no file.

    Raises ValueError saying what is wrong when the file is empty (the run
    always writes a header) or cannot be parsed as CSV text.
    """
    try:
        if Path(path).stat().st_size == 0:
            raise ValueError("is empty")
        with Path(path).open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "round" not in reader.fieldnames:
                raise ValueError("has no header with a 'round' column")
            return [r for row in reader if (r := round_of(row)) is not None]
    except FileNotFoundError:
        return None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot be read ({str(exc)[:100]})") from exc


def round_of(row: Mapping[str, str | None]) -> int | None:
    """Return the integer round of a CSV row, None when the cell is malformed."""
    try:
        return int(row.get("round") or "")
    except ValueError:
        return None


def number(cell: Any) -> float | None:
    """A finite float from a CSV cell, or None."""
    try:
        value = float(cell)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file as a dict ({} when missing, unreadable or not an object)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def read_image(path: Path) -> np.ndarray | None:
    """A sample grid as an (H, W, 3) array; None, with a warning naming it, when unreadable."""
    import imageio.v3 as iio

    try:
        return iio.imread(path, plugin="pillow", mode="RGB")
    except Exception as exc:  # noqa: BLE001 - Pillow raises several kinds for a bad file
        log(WARNING, "sample grid %s cannot be read (%s: %s); skipped", path,
            type(exc).__name__, exc)
        return None
