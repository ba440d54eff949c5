"""The curves of a run: plots/losses.png and plots/quality.png from metrics.csv.

Each PNG carries a digest of what it shows, so a plot whose data did not
change (the quality panels between evaluations) is not drawn again.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

from fedgan_app.files import atomic_write
from fedgan_app.outputs.runfolder import LOSSES_PLOT, QUALITY_PLOT, ROUND_KEY, RunFolder
from fedgan_app.quality.metrics import QUALITY_KEYS

LOSS_COLUMNS = ("loss-d", "loss-g")
D_OUTPUT_COLUMNS = ("d-x", "d-gz")
QUALITY_COLUMNS = (*QUALITY_KEYS, "conditional-accuracy")
PLOT_DIGEST_KEY = "fedgan-data-digest"  # PNG text chunk: what a plot shows


def write_plots(run_dir: Path) -> list[Path]:
    """Write plots/losses.png (losses, D outputs) and plots/quality.png from metrics.csv.

    Returns the plots written (a plot whose columns have no value yet is skipped).
    """
    folder = RunFolder(run_dir)
    rows = folder.metrics_rows()
    written = []
    for name, panels in ((LOSSES_PLOT, [LOSS_COLUMNS, D_OUTPUT_COLUMNS]),
                         (QUALITY_PLOT, [(c,) for c in QUALITY_COLUMNS])):
        path = folder.plot(name)
        if _plot(rows, path, panels):
            written.append(path)
    return written



def _plot(rows: list[dict[str, Any]], path: Path, panels: list[tuple[str, ...]]) -> bool:
    """Plot metrics columns vs round, one panel per group with data; False when none has."""
    # No pyplot: no global figure state to close, no GUI backend to pick.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    series = {c: _column(rows, c) for cols in panels for c in cols}
    panels = [cols for cols in panels if any(series[c][0] for c in cols)]
    if not panels:
        return False
    # The PNG carries a digest of what it shows: an unchanged plot (the quality
    # panels between evaluations) is not drawn again.
    digest = hashlib.sha256(repr([(c, series[c]) for cols in panels for c in cols])
                            .encode()).hexdigest()
    if _png_digest(path) == digest:
        return True
    # One column for two panels, two columns beyond: a page shows it without scrolling.
    ncols = 1 if len(panels) <= 2 else 2
    nrows = math.ceil(len(panels) / ncols)
    height = 2.4 * nrows  # inches
    fig = Figure(figsize=(6.4 if ncols == 1 else 9.2, height))
    # A fixed layout: matplotlib's constrained layout tripled the time of a plot.
    fig.subplots_adjust(left=0.1 if ncols == 1 else 0.07, right=0.98,
                        top=1 - 0.12 / height, bottom=0.45 / height,
                        hspace=0.5 if nrows > 1 else 0.2, wspace=0.22)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, columns in zip(axes, panels, strict=False):
        for column in columns:
            rounds, values = series[column]
            if rounds:
                ax.plot(rounds, values, marker="." if len(rounds) < 50 else None,
                        label=column)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        shown = {r for c in columns for r in series[c][0]}
        if len(shown) == 1:  # one point: one tick, not 2.84 .. 3.16
            ax.set_xticks(sorted(shown))
        ax.grid(alpha=0.3)
        ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100,
                                               metadata={PLOT_DIGEST_KEY: digest}))
    return True


def _png_digest(path: Path) -> str | None:
    """The data digest a plot PNG was written with, if it has one."""
    if not path.is_file():
        return None
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.text.get(PLOT_DIGEST_KEY)
    except (OSError, AttributeError):
        return None


def _column(rows: list[dict[str, Any]], name: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of the numeric cells of a column."""
    rounds, values = [], []
    for row in rows:
        try:
            value = float(row.get(name) or "")
        except ValueError:
            continue
        rounds.append(row[ROUND_KEY])
        values.append(value)
    return rounds, values
