"""The federation animation: ``federation.gif`` drawn from a run folder's real rows.

Every frame is computed from what the run wrote, nothing is a cartoon: the
rows and grids are read into a `RunView` (fedgan_app.outputs.runview), each
round is drawn by `RoundFigure` (fedgan_app.outputs.animation_figure) in the
phases and layout of fedgan_app.outputs.animation_layout, and this module
writes the frames as one looping GIF.

``python -m fedgan_app.outputs.animation outputs/<run> [--out PATH]`` draws it after the
fact (a resumed run included: it reads the rows of all rounds on disk);
:func:`render_federation_gif` is the per-round hook. Frames of a round are cached
in memory, keyed on everything they are drawn from, so a per-round refresh draws
only the new round's frames.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedgan_app.files import atomic_write
from fedgan_app.outputs.animation_figure import RoundFigure
from fedgan_app.outputs.animation_layout import DPI, FIGSIZE, PHASE_MS, PHASES
from fedgan_app.outputs.runfolder import CLIENTS_CSV, METRICS_CSV, RunFolder
from fedgan_app.outputs.runview import (
    AnimationError,
    RoundView,
    RunView,
    drawn_clients,
    load_run,
)

# A long run keeps the GIF small: at most this many rounds, evenly spaced, last included.
MAX_GIF_ROUNDS = 40


def render_federation_gif(run_dir: Path, out: Path | None = None) -> Path | None:
    """Write the federation animation of a run folder (the per-round hook).

    Parameters
    ----------
    run_dir : Path
        The run folder (``outputs/<run>``).
    out : Path | None
        Where to write the GIF; ``run_dir / "federation.gif"`` when None.

    Returns
    -------
    Path | None
        The GIF written, or None when the run has no round yet.

    Notes
    -----
    The GIF holds :data:`FRAMES_PER_ROUND` frames per round (at most
    :data:`MAX_GIF_ROUNDS` rounds). Frames are cached per round in this
    process, keyed on everything they are drawn from, so calling this after
    every round draws only the new round. The file is written to a temp file
    and renamed.

    """
    run = load_run(run_dir)
    if not run.rounds:
        return None
    out = Path(out) if out is not None else RunFolder(run_dir).federation_gif
    frames: list[Any] = []
    durations: list[int] = []
    for view in gif_rounds(run.rounds):
        layout = _layout_key(run, view)
        frames.extend(_cached_round_frames(Path(run_dir), run, view, layout))
        durations.extend(PHASE_MS[phase] for phase, n in PHASES for _ in range(n))
    durations[-1] += 1500  # hold the last frame before the loop restarts
    _write_gif(out, frames, durations)
    return out


def gif_rounds(rounds: Sequence[RoundView]) -> list[RoundView]:
    """The rounds a GIF shows: all, or MAX_GIF_ROUNDS evenly spaced with the last."""
    if len(rounds) <= MAX_GIF_ROUNDS:
        return list(rounds)
    picks = np.linspace(0, len(rounds) - 1, MAX_GIF_ROUNDS).round().astype(int)
    return [rounds[i] for i in sorted(set(picks.tolist()))]


def _cached_round_frames(run_dir: Path, run: RunView, view: RoundView,
                         layout: str) -> list[Any]:
    """The GIF frames (palette images) of one round, drawn only when their data changed."""
    from PIL import Image

    key = (str(run_dir.resolve()), view.server_round)
    signature = _round_signature(run, view, layout)
    cached = _FRAME_CACHE.get(key)
    if cached is None or cached[0] != signature:
        frames = [_to_palette(f) for f in RoundFigure(run, view).frames()]
        cached = (signature, [_png_bytes(f) for f in frames])
        _FRAME_CACHE[key] = cached
        while len(_FRAME_CACHE) > _CACHE_ROUNDS:
            _FRAME_CACHE.popitem(last=False)
    _FRAME_CACHE.move_to_end(key)
    return [Image.open(io.BytesIO(data)) for data in cached[1]]


# (run folder, round) -> (signature, PNG bytes of its palette frames): a round's
# mostly white frames take tens of kB this way instead of MBs of raw pixels.
_FRAME_CACHE: OrderedDict[tuple[str, int], tuple[str, list[bytes]]] = OrderedDict()
_CACHE_ROUNDS = 4 * MAX_GIF_ROUNDS


def clear_cache() -> None:
    """Forget every cached frame (the next GIF is drawn anew)."""
    _FRAME_CACHE.clear()


def _round_signature(run: RunView, view: RoundView, layout: str) -> str:
    """A hash of everything a round's frames are drawn from."""
    grids = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) if p and p.is_file() else None
             for p in (view.grid_before, view.grid_after)]
    text = repr((layout, run.num_rounds, run.aggregation, view.server_round,
                 sorted(view.metrics.items()), view.replies, grids, PHASES, FIGSIZE, DPI))
    return hashlib.sha256(text.encode()).hexdigest()


def _layout_key(run: RunView, view: RoundView) -> str:
    """What a round's client layout depends on (its picture changes with it)."""
    return repr((drawn_clients(run, view), run.num_classes))



def _to_palette(frame: np.ndarray) -> Any:
    """A frame as a 256-colour palette image (what a GIF stores), quantized once."""
    from PIL import Image

    return Image.fromarray(frame).quantize(256, method=Image.Quantize.FASTOCTREE,
                                           dither=Image.Dither.NONE)


def _png_bytes(image: Any) -> bytes:
    """PNG bytes of a palette image (lossless, keeps the palette)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _write_gif(out: Path, frames: list[Any], durations: list[int]) -> None:
    """Write palette frames as a looping GIF atomically (Pillow, no re-quantizing)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: frames[0].save(
        tmp, format="GIF", save_all=True, append_images=frames[1:], duration=durations,
        loop=0))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: draw outputs/<run>/federation.gif (or --out) from the run's files."""
    parser = argparse.ArgumentParser(
        prog="python -m fedgan_app.outputs.animation",
        description="Draw the federation animation of a run folder from its CSVs and grids.",
    )
    parser.add_argument("run_dir", type=Path, help="the run folder, e.g. outputs/<run>")
    parser.add_argument("--out", type=Path, default=None,
                        help="GIF to write (default: <run_dir>/federation.gif)")
    args = parser.parse_args(argv)
    run_dir: Path = args.run_dir
    folder = RunFolder(run_dir)
    if run_dir.is_dir() and not any(p.is_file() for p in (folder.metrics_csv,
                                                          folder.clients_csv)):
        print(f"fedgan animate: {run_dir} has neither {METRICS_CSV} nor {CLIENTS_CSV}: "
              "not a run folder", file=sys.stderr)
        return 2
    try:
        path = render_federation_gif(run_dir, args.out)
    except AnimationError as exc:
        print(f"fedgan animate: {exc}", file=sys.stderr)
        return 2
    if path is None:
        print(f"fedgan animate: {run_dir} has no finished round yet", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
