"""The per-round refresh of a run folder's views, a pure function of the folder.

:func:`refresh_run` reads only the files the run wrote and rewrites::

    plots/losses.png, plots/quality.png   the curves in metrics.csv (fedgan_app.outputs.plots)
    progress.gif                          the sample grids in round order
    federation.gif                        the federation animation (fedgan_app.outputs.animation)
    dashboard.html, dashboard.json        the page, and its version, written last
                                          (fedgan_app.outputs.page)

`LocalFiles.refresh` (fedgan_app.outputs.tracking) calls it after every round,
the animations on a time budget (`AnimationBudget`); the dashboard's server
calls it once for a folder without a page.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.logger import log

from fedgan_app.files import atomic_write
from fedgan_app.outputs.animation import render_federation_gif
from fedgan_app.outputs.page import write_page
from fedgan_app.outputs.plots import write_plots
from fedgan_app.outputs.runfolder import (
    DASHBOARD_PAGE,
    FEDERATION_GIF,
    PLOTS_DIR,
    PROGRESS_GIF,
    RunFolder,
    read_image,
)

GIF_FPS = 4.0


def refresh_run(run_dir: Path, animations: bool = True) -> float:
    """Rewrite a run folder's plots, progress.gif, federation.gif and dashboard page.

    Parameters
    ----------
    run_dir : Path
        The run folder (``outputs/<run>``).
    animations : bool
        Also redraw progress.gif and federation.gif (False: leave them as they
        are; see `AnimationBudget`).

    Returns
    -------
    float
        Seconds spent on the animations (0 when they were left as they are).

    Notes
    -----
    The per-round hook: call it after a round's rows and grid are on disk.
    Each view is written atomically; one that fails is logged as a warning
    and the others are still written, so a broken view never stops training.
    The page and its version file come last, so a browser that reloads finds
    every file the page links to.

    """
    run_dir = Path(run_dir)
    steps: list[tuple[str, Callable[[Path], Any], bool]] = [
        (PLOTS_DIR, write_plots, False),
        (PROGRESS_GIF, write_progress_gif, True),
        (FEDERATION_GIF, render_federation_gif, True),
        (DASHBOARD_PAGE, write_page, False),
    ]
    animation_s = 0.0
    for name, step, animation in steps:
        if animation and not animations:
            continue
        started = time.perf_counter()
        try:
            step(run_dir)
        except Exception as exc:  # noqa: BLE001 - a view must never stop a run
            log(WARNING, "refresh of %s in %s failed (%s: %s); the other views go on",
                name, run_dir, type(exc).__name__, exc)
        if animation:
            animation_s += time.perf_counter() - started
    return animation_s


class AnimationBudget:
    """When a per-round refresh redraws the animations: at most `share` of the wall time.

    progress.gif and federation.gif are encoded again from every round so far,
    so each redraw costs more than the last. After a redraw that took c
    seconds, the next one is due c * (1/share - 1) seconds later, so redraws
    take at most `share` of the time; share 1 redraws after every round. The
    page, plots and grids are not budgeted: they are written every round.
    """

    def __init__(self, share: float, clock: Callable[[], float] = time.monotonic) -> None:
        """Redraws may take `share` (0 < share <= 1) of the time `clock` measures."""
        if not 0 < share <= 1:
            raise ValueError(f"animation share must be > 0 and <= 1, got {share}")
        self.share = share
        self.clock = clock
        self._next = -math.inf

    def due(self) -> bool:
        """Whether the animations may be redrawn now."""
        return self.share >= 1 or self.clock() >= self._next

    def spent(self, seconds: float) -> None:
        """Record a redraw that just took `seconds`."""
        self._next = self.clock() + seconds * (1 / self.share - 1)


def write_progress_gif(run_dir: Path) -> Path | None:
    """Write progress.gif from samples/round_NNNN.png in round order (4 fps, looping).

    A grid that cannot be read is skipped with a warning naming it.
    """
    import imageio.v3 as iio

    folder = RunFolder(run_dir)
    frames = [f for path in folder.sample_paths().values()
              if (f := read_image(path)) is not None]
    if not frames:
        return None
    size = frames[-1].shape
    same = [f for f in frames if f.shape == size]
    if len(same) < len(frames):
        log(WARNING, "progress.gif: skipped %d grids whose size differs from %s",
            len(frames) - len(same), size)
    path = folder.progress_gif
    atomic_write(path, lambda tmp: iio.imwrite(tmp, np.stack(same), duration=1000 / GIF_FPS,
                                                loop=0))
    return path

