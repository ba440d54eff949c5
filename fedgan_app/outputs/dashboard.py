"""The live dashboard: a static page of a run folder, rewritten after every round.

:func:`refresh_run` is the per-round refresh of a run folder's views, a pure
function of the folder (it reads only the files the run wrote)::

    plots/losses.png, plots/quality.png   the curves in metrics.csv
    progress.gif                          the sample grids in round order
    federation.gif                        the federation animation (fedgan_app.outputs.animation)
    dashboard.html, dashboard.json        the page, and its version (written last)

The page is plain HTML with relative links into the run folder: no server-side
code, no network, nothing to install. Served (``python -m fedgan_app.outputs.dashboard``,
``./fedgan.sh dashboard``), it polls ``dashboard.json`` every two seconds and
reloads itself when a round has rewritten the page; opened as a file, it reloads
every ten seconds. It works the same during the run and long after it.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import math
import os
import re
import signal
import stat as stat_module
import sys
import time
import webbrowser
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from logging import WARNING
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
from flwr.common.logger import log

from fedgan_app.outputs.animation import (
    AnimationError,
    Reply,
    RunView,
    class_colors,
    load_run,
    read_csv_rows,
    read_image,
    read_run_config,
    render_federation_gif,
)
from fedgan_app.quality.metrics import QUALITY_KEYS
from fedgan_app.files import atomic_write, write_json, write_text

PAGE = "dashboard.html"
STATE = "dashboard.json"
DEFAULT_PORT = 8765
POLL_MS = 2000
LOSS_COLUMNS = ("loss-d", "loss-g")
D_OUTPUT_COLUMNS = ("d-x", "d-gz")
QUALITY_COLUMNS = (*QUALITY_KEYS, "conditional-accuracy")
PLOT_DIGEST_KEY = "fedgan-data-digest"  # PNG text chunk: what a plot shows
GIF_FPS = 4.0
GRID_SCALE = 2  # sample grids are small: shown at twice their size, pixel for pixel


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
        ("plots", write_plots, False),
        ("progress.gif", write_progress_gif, True),
        ("federation.gif", render_federation_gif, True),
        (PAGE, write_page, False),
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
    so each redraw costs more than the last (0.55 s a round by round 20 of the
    default run on 2 cores, 5% of its wall time). After a redraw that took c
    seconds, the next one is due c * (1/share - 1) seconds later, so redraws
    take at most `share` of the time; share 1 redraws after every round. The
    page, plots and grids are not budgeted: they are written every round.
    """

    def __init__(self, share: float, clock: Callable[[], float] = time.monotonic) -> None:
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


def write_plots(run_dir: Path) -> list[Path]:
    """Write plots/losses.png (losses, D outputs) and plots/quality.png from metrics.csv.

    Returns the plots written (a plot whose columns have no value yet is skipped).
    """
    rows = read_csv_rows(Path(run_dir) / "metrics.csv")
    written = []
    for name, panels in (("losses.png", [LOSS_COLUMNS, D_OUTPUT_COLUMNS]),
                         ("quality.png", [(c,) for c in QUALITY_COLUMNS])):
        path = Path(run_dir) / "plots" / name
        if _plot(rows, path, panels):
            written.append(path)
    return written


def write_progress_gif(run_dir: Path) -> Path | None:
    """Write progress.gif from samples/round_NNNN.png in round order (4 fps, looping).

    A grid that cannot be read is skipped with a warning naming it.
    """
    import imageio.v3 as iio

    run_dir = Path(run_dir)
    frames = [f for path in _rounds_of(run_dir / "samples", "round_").values()
              if (f := read_image(path)) is not None]
    if not frames:
        return None
    size = frames[-1].shape
    same = [f for f in frames if f.shape == size]
    if len(same) < len(frames):
        log(WARNING, "progress.gif: skipped %d grids whose size differs from %s",
            len(frames) - len(same), size)
    path = run_dir / "progress.gif"
    atomic_write(path, lambda tmp: iio.imwrite(tmp, np.stack(same), duration=1000 / GIF_FPS,
                                                loop=0))
    return path


def write_page(run_dir: Path) -> Path:
    """Write dashboard.html from the run folder's files, then dashboard.json.

    Parameters
    ----------
    run_dir : Path
        The run folder.

    Returns
    -------
    Path
        The page.

    """
    run_dir = Path(run_dir)
    body = _page_html(run_dir)
    version = hashlib.sha256(body.encode()).hexdigest()[:16]
    write_text(run_dir / PAGE, body.replace("__VERSION__", version))
    metric_rows = read_csv_rows(run_dir / "metrics.csv")
    state = {"version": version, "round": metric_rows[-1]["__round"] if metric_rows else 0,
             "updated": datetime.now().isoformat(timespec="seconds")}
    write_json(run_dir / STATE, state)
    return run_dir / PAGE


def _page_html(run_dir: Path) -> str:
    """The whole page (its version left as __VERSION__)."""
    config = read_run_config(run_dir / "run_config.json")
    metric_rows = read_csv_rows(run_dir / "metrics.csv")
    last = metric_rows[-1] if metric_rows else None
    planned = config.get("num-server-rounds")
    done = last["__round"] if last else 0
    status = ("finished" if isinstance(planned, int) and done >= planned
              else "waiting for round 1" if not last else "running")
    try:
        run = load_run(run_dir)
    except AnimationError:
        run = None
    grid_round, grid = _newest(run_dir / "samples", "round_")
    class_round, class_grid = _newest(run_dir / "samples", "classes_round_")

    panels = [_image_panel(run_dir, grid, f"samples after round {grid_round}", "grid",
                           GRID_SCALE)]
    if class_grid is not None:
        panels.append(_image_panel(run_dir, class_grid,
                                   f"one row per class, round {class_round}", "class-grid",
                                   GRID_SCALE))
    panels.append(_image_panel(run_dir, _file(run_dir / "federation.gif"),
                               "the federation, round by round", "federation"))
    curves = [_image_panel(run_dir, _file(run_dir / "plots" / name), title, f"plot-{key}")
              for key, name, title in (("losses", "losses.png", "losses and D outputs"),
                                       ("quality", "quality.png", "sample quality"))]
    name = html.escape(run_dir.name)
    total = f" of {planned}" if isinstance(planned, int) else ""
    return _TEMPLATE.format(
        title=f"fedgan · {name}",
        name=name,
        round=done,
        progress=f"round {done}{total}",
        status=status,
        updated=datetime.now().strftime("%H:%M:%S"),
        panels="\n".join(panels),
        curves="\n".join(curves),
        metrics=_metrics_table(last),
        clients=_clients_table(run) if run is not None else "<p>no client rows yet</p>",
        progress_gif=_image_panel(run_dir, _file(run_dir / "progress.gif"),
                                  "sample grids, round by round", "progress", GRID_SCALE),
        poll_ms=POLL_MS,
    )


def _image_panel(run_dir: Path, path: Path | None, caption: str, key: str,
                 scale: int = 1) -> str:
    """A figure with an image of the run folder (cache-busted by its mtime), or a note."""
    if path is None:
        return (f'<figure class="panel" id="{key}"><div class="missing">not yet written'
                f'</div><figcaption>{html.escape(caption)}</figcaption></figure>')
    rel = path.relative_to(run_dir).as_posix()
    size = ""
    if scale != 1 and (shape := _image_size(path)) is not None:
        height, width = shape
        size = f' width="{width * scale}" height="{height * scale}" class="pixelated"'
    return (f'<figure class="panel" id="{key}"><img src="{html.escape(rel)}?v='
            f'{path.stat().st_mtime_ns}" alt="{html.escape(caption)}"{size}>'
            f'<figcaption>{html.escape(caption)}</figcaption></figure>')


def _metrics_table(row: dict[str, Any] | None) -> str:
    """The latest metrics.csv row as a two-column table."""
    if row is None:
        return "<p>no round finished yet</p>"
    cells = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>"
        for k, v in row.items() if k not in ("__round",) and v not in ("", None)
    )
    return f'<table class="metrics">{cells}</table>'


def _clients_table(run: RunView) -> str:
    """One row per client: data, last reply (time, losses, weight), drops and failures."""
    if not run.clients:
        return "<p>no client rows yet</p>"
    replies: dict[str, list[tuple[int, Reply]]] = {}
    for view in run.rounds:
        for reply in view.replies:
            replies.setdefault(reply.client, []).append((view.server_round, reply))
    colors = [_hex(c) for c in class_colors(max(run.num_classes, 1))]
    head = ("<tr><th>client</th><th>examples</th><th>label histogram</th><th>last round</th>"
            "<th>status</th><th>wall time s</th><th>mean wall time s</th><th>loss D</th>"
            "<th>loss G</th><th>weight p_j</th><th>accepted</th><th>dropped</th>"
            "<th>failed</th><th>last drop or failure</th></tr>")
    rows = []
    for client in run.clients:
        history = replies.get(client.key, [])
        last_round, last = history[-1]
        times = [r.wall_time_s for _, r in history if r.wall_time_s is not None]
        counts = {s: sum(1 for _, r in history if r.status == s)
                  for s in ("accepted", "dropped", "failed")}
        problems = [(n, r) for n, r in history if r.status != "accepted"]
        problem = (f"round {problems[-1][0]}: {problems[-1][1].status}"
                   + (f" ({problems[-1][1].reason})" if problems[-1][1].reason else "")
                   if problems else "")
        cells = [
            client.label, _fmt(client.num_examples), _histogram_bar(client.histogram, colors),
            str(last_round), last.status, _fmt(last.wall_time_s),
            _fmt(sum(times) / len(times) if times else None), _fmt(last.loss_d),
            _fmt(last.loss_g), _fmt(last.weight), str(counts["accepted"]),
            str(counts["dropped"]), str(counts["failed"]), problem,
        ]
        row = "".join(
            f"<td>{c}</td>" if i == 2 else f"<td>{html.escape(c)}</td>"
            for i, c in enumerate(cells)
        )
        rows.append(f'<tr class="{html.escape(last.status)}">{row}</tr>')
    return f'<table class="clients"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _histogram_bar(histogram: tuple[int, ...] | None, colors: list[str]) -> str:
    """A stacked bar of a label histogram in the animation's class colours."""
    if not histogram:
        return '<span class="unknown">unknown</span>'
    total = sum(histogram)
    colors = colors + [_hex(c) for c in class_colors(len(histogram))][len(colors):]
    parts = "".join(
        f'<span style="width:{100 * n / total:.2f}%;background:{colors[c]}" '
        f'title="class {c}: {n}"></span>'
        for c, n in enumerate(histogram) if n > 0
    )
    return f'<span class="hist">{parts}</span>'


def _fmt(value: Any) -> str:
    """A cell: numbers with 4 significant digits, empty for None."""
    if value is None or value == "":
        return ""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(number):
        return str(number)
    return str(int(number)) if number.is_integer() else f"{number:.4g}"


def _hex(color: Any) -> str:
    """A matplotlib colour as #rrggbb."""
    from matplotlib.colors import to_hex

    return to_hex(color)


def _newest(folder: Path, prefix: str) -> tuple[int | None, Path | None]:
    """(round, path) of the newest ``<prefix>NNNN.png`` in a folder, or (None, None)."""
    found = _rounds_of(folder, prefix)
    if not found:
        return None, None
    server_round = max(found)
    return server_round, found[server_round]


def _rounds_of(folder: Path, prefix: str) -> dict[int, Path]:
    """Round -> path of the ``<prefix>NNNN.png`` files of a folder, in round order."""
    found = {}
    for path in folder.glob(f"{prefix}*.png"):
        stem = path.stem.removeprefix(prefix)
        if stem.isdigit():
            found[int(stem)] = path
    return dict(sorted(found.items()))


def _file(path: Path) -> Path | None:
    """The path when the file exists, else None."""
    return path if path.is_file() else None


def _image_size(path: Path) -> tuple[int, int] | None:
    """(height, width) of an image file; None when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, UnidentifiedImageError):
        return None


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
        rounds.append(row["__round"])
        values.append(value)
    return rounds, values


_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="fedgan-version" content="__VERSION__">
<title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 16px 24px; color: #222; }}
header {{ display: flex; gap: 24px; align-items: baseline; flex-wrap: wrap; }}
h1 {{ font-size: 20px; margin: 0; }}
h2 {{ font-size: 16px; margin: 20px 0 8px; }}
.status {{ color: #555; }}
.panels {{ display: flex; gap: 20px; flex-wrap: wrap; align-items: flex-start; }}
figure.panel {{ margin: 0; }}
figcaption {{ color: #555; font-size: 12px; }}
img.pixelated {{ image-rendering: pixelated; }}
.missing {{ width: 240px; height: 120px; display: flex; align-items: center;
           justify-content: center; background: #f3f3f3; color: #888; }}
table {{ border-collapse: collapse; font-size: 12px; }}
th, td {{ border-bottom: 1px solid #e5e5e5; padding: 3px 8px; text-align: left; }}
tr.dropped td {{ background: #fde6f2; }}
tr.failed td {{ background: #eeeeee; }}
.hist {{ display: inline-flex; width: 120px; height: 12px; background: #eee; }}
.hist span {{ display: inline-block; height: 12px; }}
.unknown {{ color: #999; }}
</style>
</head>
<body data-round="{round}">
<header>
<h1>fedgan run <code>{name}</code></h1>
<span id="progress">{progress}</span>
<span class="status">{status} · page written {updated}</span>
</header>
<h2>latest samples and the federation</h2>
<div class="panels">
{panels}
</div>
<h2>curves</h2>
<div class="panels">
{curves}
</div>
<h2>latest round</h2>
{metrics}
<h2>clients</h2>
{clients}
<h2>progress</h2>
<div class="panels">
{progress_gif}
</div>
<script>
// Reload when a round has rewritten the page: dashboard.json is written last.
const version = "__VERSION__";
async function poll() {{
  try {{
    const reply = await fetch("{state}", {{cache: "no-store"}});
    const state = await reply.json();
    if (state.version !== version) {{ location.reload(); return; }}
  }} catch (err) {{
    // Opened as a file: no fetch; reload now and then instead.
    if (location.protocol === "file:") {{ setTimeout(() => location.reload(), 10000); return; }}
  }}
  setTimeout(poll, {poll_ms});
}}
poll();
</script>
</body>
</html>
""".replace("{state}", STATE)


# What the page loads, relative to the run folder: the page, its version, the
# animations, the plots and the sample grids. Nothing else is served: no
# checkpoints, no CSVs, no W&B files, no folder listings.
_SERVED = re.compile(
    r"(dashboard\.html|dashboard\.json|progress\.gif|federation\.gif"
    r"|plots/[A-Za-z0-9_.-]+\.png|samples/[A-Za-z0-9_.-]+\.png)"
)


class _Handler(SimpleHTTPRequestHandler):
    """Serves the page's files of one run folder (GET and HEAD); nothing is cached.

    '/' goes to the page. A request is answered only when its Host header names
    the address served (127.0.0.1, localhost or [::1] and the port), so a web
    page elsewhere cannot reach the dashboard by DNS rebinding (403), and only
    for a path the page loads (`_SERVED`) that is a regular file inside the
    run folder, symlinks resolved (404 for anything else).
    """

    def send_head(self) -> Any:
        """Check Host and path; send the headers; return the open file (or None)."""
        if not self._host_allowed():
            self.send_error(HTTPStatus.FORBIDDEN, "unexpected Host header")
            return None
        wanted = unquote(self.path.split("?", 1)[0].split("#", 1)[0])
        if wanted in ("", "/"):
            self.send_response(HTTPStatus.FOUND)
            self.send_header("Location", "/" + PAGE)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        handle = self._open_served(wanted)
        if handle is None:
            self.send_error(HTTPStatus.NOT_FOUND, "not part of the dashboard")
            return None
        stat = os.fstat(handle.fileno())
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", self.guess_type(wanted))
        self.send_header("Content-Length", str(stat.st_size))
        self.send_header("Last-Modified", self.date_time_string(int(stat.st_mtime)))
        self.end_headers()
        return handle

    def _host_allowed(self) -> bool:
        """Whether the Host header names the address this server listens on."""
        port = self.server.server_address[1]
        names = {"127.0.0.1", "localhost", "[::1]", self.server.server_address[0]}
        allowed = {f"{name}:{port}".lower() for name in names}
        return (self.headers.get("Host") or "").strip().lower() in allowed

    def _open_served(self, wanted: str) -> Any:
        """The open file a URL path names, or None unless it is one the page loads."""
        if not wanted.startswith("/") or not _SERVED.fullmatch(wanted[1:]):
            return None
        root = Path(self.directory)
        try:
            # Symlinks resolved: whatever a name points at must lie in the run folder.
            target = (root / wanted[1:]).resolve(strict=True)
            if not target.is_relative_to(root):
                return None
            # O_NONBLOCK: a FIFO named like a grid must not hang the request.
            fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except (OSError, RuntimeError):  # missing, a loop of links, ...
            return None
        if not stat_module.S_ISREG(os.fstat(fd).st_mode):  # a folder, a FIFO, ...
            os.close(fd)
            return None
        return os.fdopen(fd, "rb")

    def end_headers(self) -> None:
        """Every reply says: do not cache (files change every round)."""
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        """Quiet: one line per poll would flood the terminal."""


def serve(run_dir: Path, port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Start serving a run folder's dashboard on host:port (port 0: any free port).

    Parameters
    ----------
    run_dir : Path
        The run folder to serve.
    port : int
        TCP port; 0 picks a free one.
    host : str
        Address to bind; localhost by default (the page is for this machine).

    Returns
    -------
    ThreadingHTTPServer
        The bound server; call ``serve_forever()`` (and ``shutdown()``,
        ``server_close()`` to stop it).

    Notes
    -----
    Only the files the page loads are served, as GET or HEAD requests whose
    Host header names this address (see `_Handler`).

    """
    handler = partial(_Handler, directory=str(Path(run_dir).resolve()))
    return ThreadingHTTPServer((host, port), handler)


def newest_run(outputs: Path) -> Path:
    """The run folder under ``outputs`` whose metrics.csv (or config) changed last."""
    candidates = []
    for folder in Path(outputs).glob("*/"):
        stamps = [p.stat().st_mtime for p in (folder / "metrics.csv",
                                               folder / "run_config.json") if p.is_file()]
        if stamps:
            candidates.append((max(stamps), folder))
    if not candidates:
        raise FileNotFoundError(f"no run folder under {outputs}/ (a folder with "
                                "run_config.json or metrics.csv); pass one")
    return max(candidates)[1]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: serve a run folder's live dashboard on localhost until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m fedgan_app.outputs.dashboard",
        description="Serve the live dashboard of a run folder on localhost (Ctrl-C stops).",
    )
    parser.add_argument("run_dir", type=Path, nargs="?", default=None,
                        help="the run folder (default: the newest under --outputs)")
    parser.add_argument("--outputs", type=Path, default=Path("outputs"),
                        help="where to look for the newest run (default: outputs)")
    parser.add_argument("--port", type=int, default=None,
                        help=f"TCP port (default: {DEFAULT_PORT}, or a free one if taken)")
    parser.add_argument("--no-open", action="store_true",
                        help="do not open a browser, only print the URL")
    args = parser.parse_args(argv)
    try:
        run_dir = args.run_dir or newest_run(args.outputs)
    except FileNotFoundError as exc:
        print(f"fedgan dashboard: {exc}", file=sys.stderr)
        return 2
    if not run_dir.is_dir():
        print(f"fedgan dashboard: run folder {run_dir} does not exist", file=sys.stderr)
        return 2
    if not (run_dir / PAGE).is_file():
        refresh_run(run_dir)  # a run from before the page existed, or not started yet
    try:
        server = serve(run_dir, DEFAULT_PORT if args.port is None else args.port)
    except OSError as exc:
        if args.port is not None:
            print(f"fedgan dashboard: cannot listen on port {args.port} ({exc.strerror}); "
                  "pick another with --port", file=sys.stderr)
            return 2
        server = serve(run_dir, 0)  # the default port is taken: any free one
    url = f"http://127.0.0.1:{server.server_address[1]}/{PAGE}"
    print(f"fedgan dashboard: {run_dir} at {url} (Ctrl-C stops)", flush=True)
    if not args.no_open and _has_display():
        webbrowser.open(url)
    # SIGTERM (kill, a closing terminal) stops it as cleanly as Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    print("fedgan dashboard: stopped", flush=True)
    return 0


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    """Signal handler: stop serving as on Ctrl-C."""
    raise KeyboardInterrupt


def _has_display() -> bool:
    """Whether a graphical browser can open (else webbrowser may start a text one)."""
    return (sys.platform in ("darwin", "win32")
            or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")))


if __name__ == "__main__":
    sys.exit(main())
