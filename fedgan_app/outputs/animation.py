"""The federation animation: ``federation.gif`` drawn from a run folder's real rows.

Every frame is computed from what the run wrote, nothing is a cartoon::

    metrics.csv              the round number and its key metrics (losses, D outputs, fid)
    clients.csv              one row per reply: who answered, how long it trained,
                             its weight p_j, its label histogram, dropped or failed
    samples/round_NNNN.png   the global sample grid, shown as an inset
    run_config.json          the planned number of rounds and the aggregation rule

A round is drawn in :data:`PHASES`: the clients train (a ring sweeps around each
client, closing when it finishes: its length is the client's wall time relative
to the slowest), the updates go to the server (red arrows, width proportional to
p_j; dropped replies in magenta with their reason; failed clients crossed out),
the server aggregates, and the new model goes back out (blue arrows). Each client
is a pie of its label histogram (grey when unknown) whose area is proportional to
its number of examples, so non-IID data is visible at a glance.

``python -m fedgan_app.outputs.animation outputs/<run> [--out PATH]`` draws it after the
fact (a resumed run included: it reads the rows of all rounds on disk);
:func:`render_federation_gif` is the per-round hook. Frames of a round are cached
in memory, keyed on everything they are drawn from, so a per-round refresh draws
only the new round's frames.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import json
import math
import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.logger import log

from fedgan_app.files import atomic_write

# (phase, frames): the train phase has several frames so the clients' rings can
# sweep at speeds given by their wall times; the others are one frame each.
PHASES: tuple[tuple[str, int], ...] = (
    ("train", 4),
    ("upload", 1),
    ("aggregate", 1),
    ("broadcast", 1),
)
FRAMES_PER_ROUND = sum(n for _, n in PHASES)
PHASE_MS = {"train": 250, "upload": 700, "aggregate": 500, "broadcast": 600}
# A long run keeps the GIF small: at most this many rounds, evenly spaced, last included.
MAX_GIF_ROUNDS = 40
# Up to this many clients in the whole run, every frame draws all of them in fixed
# places; a larger federation (clients sampled per round) draws each round's own
# clients only, so a round's frames never change when later rounds bring new clients.
MAX_FIXED_CLIENTS = 24

UPDATE_COLOR = "#d62728"  # red: an accepted update on its way to the server
MODEL_COLOR = "#1f77b4"  # blue: the new global model going back out
DROP_COLOR = "#e6007e"  # magenta: a dropped reply (no class palette uses it)
FAIL_COLOR = "#000000"  # black cross: a client whose reply was an error
PULSE_COLOR = "#2ca02c"  # green ring: a client training
AGGREGATE_COLOR = "#ffbf00"  # amber halo: the server aggregating
UNKNOWN_DATA_COLOR = "#bdbdbd"  # grey pie: label histogram unknown
SERVER_COLOR = "#404040"

FIGSIZE = (7.2, 4.5)
DPI = 80
# The federation diagram's place in a frame (figure fraction: left, bottom, width,
# height); the sample grid, legend and class colours lie to its right.
DIAGRAM_BOX = (0.0, 0.07, 0.64, 0.8)
INSET_BOX = (0.655, 0.2, 0.33, 0.57)  # the sample grid
LEGEND_BOX = (0.655, 0.0, 0.345, 0.19)  # what the colours mean, the class colours
_CLIENT_RING = 0.8  # clients sit on a circle of this radius around the server
_SERVER_RADIUS = 0.17
_STATUSES = ("accepted", "dropped", "failed")


class AnimationError(ValueError):
    """A run folder cannot be animated (names the missing or broken file)."""


@dataclass(frozen=True)
class Reply:
    """One client's reply in one round, as clients.csv records it."""

    client: str  # stable key: "p<partition>" or "node <id>"
    status: str  # accepted | dropped | failed
    reason: str
    num_examples: int | None
    weight: float  # aggregation weight p_j; 0 when not accepted
    wall_time_s: float | None
    histogram: tuple[int, ...] | None
    loss_d: float | None = None
    loss_g: float | None = None


@dataclass(frozen=True)
class Client:
    """A client's place in the picture: its label, data size and label histogram."""

    key: str
    label: str
    num_examples: int | None
    histogram: tuple[int, ...] | None


@dataclass(frozen=True)
class RoundView:
    """Everything one round's frames are drawn from."""

    server_round: int
    metrics: dict[str, float]
    replies: tuple[Reply, ...]
    grid_before: Path | None  # grid of the model the clients trained from
    grid_after: Path | None  # grid of the new global model


@dataclass(frozen=True)
class RunView:
    """The rounds of a run and the clients laid out around the server."""

    rounds: tuple[RoundView, ...]
    clients: tuple[Client, ...]
    num_rounds: int | None  # planned rounds (run_config.json), when known
    aggregation: str
    num_classes: int


def load_run(run_dir: Path) -> RunView:
    """Read a run folder's metrics.csv, clients.csv, grids and config into a RunView.

    Parameters
    ----------
    run_dir : Path
        The run folder (``outputs/<run>``).

    Returns
    -------
    RunView
        Rounds in order (every round with a row in either CSV; none before the
        first round's rows are written) and the clients of the whole run,
        ordered by partition id.

    Raises
    ------
    AnimationError
        When the folder does not exist.

    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AnimationError(f"run folder {run_dir} does not exist")
    metric_rows = read_csv_rows(run_dir / "metrics.csv")
    client_rows = read_csv_rows(run_dir / "clients.csv")
    config = read_run_config(run_dir / "run_config.json")

    node_to_key = {
        row["node-id"]: f"p{int(pid)}"
        for row in client_rows
        if row.get("node-id") and (pid := _number(row.get("partition-id"))) is not None
    }
    by_round: dict[int, list[Reply]] = {}
    for row in client_rows:
        reply = _reply(row, node_to_key)
        by_round.setdefault(row["__round"], []).append(reply)
    for server_round, replies in by_round.items():
        by_round[server_round] = _with_weights(replies)
    metrics = {row["__round"]: _numeric_cells(row) for row in metric_rows}
    grids = _sample_grids(run_dir / "samples")

    rounds = []
    for server_round in sorted(set(metrics) | set(by_round)):
        before = [r for r in grids if r < server_round]
        rounds.append(RoundView(
            server_round=server_round,
            metrics=metrics.get(server_round, {}),
            replies=tuple(by_round.get(server_round, [])),
            grid_before=grids[before[-1]] if before else None,
            grid_after=grids.get(server_round),
        ))
    clients = _clients(by_round)
    num_classes = max((len(c.histogram) for c in clients if c.histogram), default=0)
    num_rounds = config.get("num-server-rounds")
    return RunView(
        rounds=tuple(rounds),
        clients=clients,
        num_rounds=int(num_rounds) if isinstance(num_rounds, int | float) else None,
        aggregation=str(config.get("strategy", config.get("aggregation", ""))),
        num_classes=num_classes,
    )


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
    out = Path(out) if out is not None else Path(run_dir) / "federation.gif"
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


class RoundFigure:
    """One round drawn on one matplotlib Figure; :meth:`show` picks a frame.

    Parameters
    ----------
    run : RunView
        The run (client layout, planned rounds, number of classes).
    view : RoundView
        The round to draw.

    Notes
    -----
    What every frame shares (pies, labels, header, legend) is drawn once into
    a background; a frame restores it and draws only its own artists (rings,
    arrows, halo, inset), several times faster than drawing each frame anew.

    """

    def __init__(self, run: RunView, view: RoundView) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.run, self.view = run, view
        self.fig = Figure(figsize=FIGSIZE, dpi=DPI)
        self.canvas = FigureCanvasAgg(self.fig)
        self.ax = self.fig.add_axes(DIAGRAM_BOX)
        self.ax.set_xlim(-1.3, 1.3)
        self.ax.set_ylim(-1.33, 1.1)
        self.ax.set_aspect("equal")
        self.ax.axis("off")
        # (artist, phases it shows in, the only train step it shows in or None)
        self._toggles: list[tuple[Any, frozenset[str], int | None]] = []
        self._replies = {r.client: r for r in view.replies}
        self.clients = drawn_clients(run, view)
        self._positions = _positions(self.clients)
        self._draw_header()
        self._draw_server()
        for client in self.clients:
            self._draw_client(client)
        self._draw_inset()
        self._draw_legend()
        self._draw_timeline()

    def show(self, phase: str, step: int = 0) -> None:
        """Switch on the artists of frame ``step`` of ``phase``, and off the rest."""
        for artist, phases, only_step in self._toggles:
            artist.set_visible(phase in phases and only_step in (None, step))

    def frames(self) -> list[np.ndarray]:
        """All frames of this round as uint8 (H, W, 3) arrays, in PHASES order."""
        for artist, _, _ in self._toggles:
            artist.set_visible(False)
        self.canvas.draw()
        background = self.canvas.copy_from_bbox(self.fig.bbox)
        renderer = self.canvas.get_renderer()
        toggled = sorted(self._toggles, key=lambda t: t[0].get_zorder())
        frames = []
        for phase, count in PHASES:
            for step in range(count):
                self.canvas.restore_region(background)
                self.show(phase, step)
                for artist, _, _ in toggled:
                    if artist.get_visible():
                        artist.draw(renderer)
                frames.append(np.asarray(self.canvas.buffer_rgba())[..., :3].copy())
        return frames

    def visible_texts(self) -> list[str]:
        """The strings of the figure's and axes' texts visible in the current frame."""
        texts = [*self.fig.texts, *(t for ax in self.fig.axes for t in ax.texts)]
        return [t.get_text() for t in texts if t.get_visible() and t.get_text()]

    def visible_marks(self) -> list[str]:
        """Ids of the client marks visible now: 'pulse:p0', 'update:p0', 'dropped:p1', ..."""
        return [a.get_gid() for a in self.fig.findobj(lambda a: bool(a.get_gid()))
                if a.get_visible()]

    def _only_in(self, artist: Any, *phases: str, step: int | None = None) -> Any:
        """Show ``artist`` only in these phases (and only at ``step`` when given)."""
        self._toggles.append((artist, frozenset(phases), step))
        return artist

    def _draw_header(self) -> None:
        """Round number, key metrics and reply counts at the top."""
        view, run = self.view, self.run
        total = f" / {run.num_rounds}" if run.num_rounds else ""
        self.fig.text(0.015, 0.955, f"round {view.server_round}{total}", fontsize=13,
                      weight="bold", va="center")
        self.fig.text(0.25, 0.955, _metrics_line(view.metrics), fontsize=8, va="center")
        self.fig.text(0.25, 0.905, _counts_line(view), fontsize=8, va="center",
                      color="#444444")

    def _draw_server(self) -> None:
        """The server; its amber halo is the aggregate phase."""
        from matplotlib.patches import Circle, Wedge

        # A ring, not a disc: frames draw it over the background, it must not hide the server.
        halo = Wedge((0, 0), _SERVER_RADIUS * 1.7, 0, 360, width=_SERVER_RADIUS * 0.65,
                     color=AGGREGATE_COLOR, lw=0)
        self._only_in(self.ax.add_patch(halo), "aggregate")
        self.ax.add_patch(Circle((0, 0), _SERVER_RADIUS, color=SERVER_COLOR, zorder=3))
        self.ax.text(0, 0, "server", color="white", ha="center", va="center", fontsize=8,
                     zorder=4)
        accepted = sum(1 for r in self.view.replies if r.status == "accepted")
        rule = self.run.aggregation or "aggregate"
        self._only_in(self.ax.text(
            0, -_SERVER_RADIUS * 1.7 - 0.08, f"{rule}: {accepted} update(s)",
            ha="center", va="top", fontsize=7, zorder=5,
        ), "aggregate")

    def _draw_client(self, client: Client) -> None:
        """A client's pie, its training ring, and its arrows for every phase."""
        from matplotlib.patches import Wedge

        center = self._positions[client.key]
        radius = _client_radius(client, self.clients)
        reply = self._replies.get(client.key)
        alpha = 1.0 if reply is not None else 0.25  # not sampled this round: faded
        for wedge in _pie(center, radius, client.histogram, self.run.num_classes):
            wedge.set_alpha(alpha)
            self.ax.add_patch(wedge)
        # Its name (and wall time) on the side away from the server, clear of arrows.
        label = client.label if len(self.clients) <= 6 else client.key.removeprefix("p")
        if reply is not None and reply.wall_time_s is not None:
            label += f" · {reply.wall_time_s:.1f} s"
        x, y, va = _label_place(center, radius)
        self.ax.text(x, y, label, ha="center", va=va, fontsize=7, alpha=alpha)
        if reply is None:
            x, y, va = _note_place(center, radius)
            self.ax.text(x, y, "no reply", ha="center", va=va, fontsize=6.5, color="#999999")
            return
        if reply.status == "failed":
            self._draw_failed(center, radius, reply)
            return
        # Training: a ring that closes when this client is done (wall-time share).
        slowest = max((r.wall_time_s or 0.0) for r in self.view.replies)
        steps = dict(PHASES)["train"]
        for step in range(steps):
            share = _progress(reply.wall_time_s, slowest, (step + 1) / steps)
            if share > 0:
                ring = Wedge(center, radius + 0.045, 90 - 360 * share, 90, width=0.03,
                             color=PULSE_COLOR, lw=0, gid=f"pulse:{client.key}")
                self._only_in(self.ax.add_patch(ring), "train", step=step)
        if reply.status == "dropped":
            self._draw_dropped(center, radius, reply)
        else:
            self._draw_update(center, radius, reply)
        self._only_in(self._arrow((0, 0), center, _SERVER_RADIUS, radius + 0.02,
                                  MODEL_COLOR, 2.0, gid=f"model:{client.key}"), "broadcast")

    def _draw_update(self, center: tuple[float, float], radius: float, reply: Reply) -> None:
        """A red arrow to the server, its width proportional to p_j."""
        width = 0.8 + 9.0 * reply.weight
        self._only_in(self._arrow(center, (0, 0), radius + 0.02, _SERVER_RADIUS + 0.02,
                                  UPDATE_COLOR, width, gid=f"update:{reply.client}"),
                      "upload")
        # The weight beside the arrow's middle, on its clockwise side.
        mid = _towards(center, (0.0, 0.0), 0.5)
        norm = math.hypot(*center) or 1.0
        side = (-center[1] / norm * 0.13, center[0] / norm * 0.13)
        self._only_in(self.ax.text(mid[0] + side[0], mid[1] + side[1],
                                   f"p={reply.weight:.2f}", fontsize=6.5, ha="center",
                                   va="center", color=UPDATE_COLOR, zorder=6), "upload")

    def _draw_dropped(self, center: tuple[float, float], radius: float, reply: Reply) -> None:
        """A magenta arrow that stops halfway, a cross, and the reason."""
        from matplotlib.lines import Line2D

        end = _towards(center, (0.0, 0.0), 0.55)
        arrow = self._arrow(center, end, radius + 0.02, 0.0, DROP_COLOR, 3.0, style="-",
                            gid=f"dropped:{reply.client}")
        stop = Line2D([end[0]], [end[1]], marker="X", markersize=11, color=DROP_COLOR,
                      zorder=6)
        self._only_in(arrow, "upload")
        self._only_in(self.ax.add_line(stop), "upload")
        # The reason stays up while the server aggregates without this reply.
        x, y, va = _note_place(center, radius)
        self._only_in(self.ax.text(x, y, _wrap("dropped: " + (reply.reason or "(no reason)"), 30),
                                   ha="center", va=va, fontsize=6.5, color=DROP_COLOR,
                                   weight="bold", zorder=6), "upload", "aggregate")

    def _draw_failed(self, center: tuple[float, float], radius: float, reply: Reply) -> None:
        """A black cross over the client and the word 'failed', in every phase."""
        from matplotlib.lines import Line2D

        self.ax.add_line(Line2D([center[0]], [center[1]], marker="X", markersize=18,
                                color=FAIL_COLOR, markeredgecolor="white", zorder=7,
                                gid=f"failed:{reply.client}"))
        x, y, va = _note_place(center, radius)
        self.ax.text(x, y, _wrap("failed" + (": " + reply.reason if reply.reason else ""), 30),
                     ha="center", va=va, fontsize=6.5, color=FAIL_COLOR, weight="bold")

    def _arrow(self, start: tuple[float, float], end: tuple[float, float], start_gap: float,
               end_gap: float, color: str, width: float, style: str = "-|>",
               gid: str | None = None) -> Any:
        """An arrow from start to end, shortened by the gaps at both ends."""
        from matplotlib.patches import FancyArrowPatch

        length = math.dist(start, end)
        a = _towards(start, end, start_gap / length)
        b = _towards(start, end, 1 - end_gap / length)
        arrow = FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=8 + width * 1.5,
                                lw=width, color=color, zorder=5, shrinkA=0, shrinkB=0,
                                gid=gid)
        self.ax.add_patch(arrow)
        return arrow

    def _draw_inset(self) -> None:
        """The global sample grid: before the round while training, after it at the end."""
        left, bottom, width, height = INSET_BOX
        fig_w, fig_h = FIGSIZE[0] * DPI, FIGSIZE[1] * DPI
        box = (round(width * fig_w), round(height * fig_h))
        for key, path, title in (
            ("before", self.view.grid_before, "global G before this round"),
            ("after", self.view.grid_after, f"global G after round {self.view.server_round}"),
        ):
            phases = ("aggregate", "broadcast") if key == "after" else ("train", "upload")
            pixels = _fit(read_image(path), box) if path is not None else None
            if pixels is not None:
                # Resampled once here and pasted pixel for pixel: far cheaper per frame
                # than an imshow that resamples the grid in every frame.
                x0 = left * fig_w + (box[0] - pixels.shape[1]) / 2
                y0 = (bottom + height) * fig_h - pixels.shape[0]
                self._only_in(self.fig.figimage(pixels, x0, y0, zorder=3), *phases)
            else:
                self._only_in(self.fig.text(left + width / 2, bottom + height / 2,
                                            "no sample grid", ha="center", va="center",
                                            fontsize=8), *phases)
            self._only_in(self.fig.text(left + width / 2, bottom + height + 0.01, title,
                                        ha="center", va="bottom", fontsize=7.5), *phases)

    def _draw_legend(self) -> None:
        """What the colours mean and the class colours: one bitmap per run, pasted."""
        pixels = _legend_pixels(self.run.num_classes)
        self.fig.figimage(pixels, LEGEND_BOX[0] * FIGSIZE[0] * DPI,
                          LEGEND_BOX[1] * FIGSIZE[1] * DPI)

    def _draw_timeline(self) -> None:
        """A bar under the picture with a marker at this frame: every frame differs.

        GIF writers merge a frame identical to the one before it, which would
        break the frames-per-round count (e.g. train steps of a round without
        wall times); the marker also tells where in the round a frame is.
        """
        from matplotlib.lines import Line2D

        y, left, right = 0.035, 0.02, 0.60
        self.fig.add_artist(Line2D([left, right], [y, y], color="#dddddd", lw=3,
                                   transform=self.fig.transFigure))
        index = 0
        for phase, count in PHASES:
            x0 = left + (right - left) * index / FRAMES_PER_ROUND
            self.fig.text(x0, y + 0.03, phase, fontsize=5.5, color="#777777", va="center")
            for step in range(count):
                x = left + (right - left) * (index + 0.5) / FRAMES_PER_ROUND
                marker = Line2D([x], [y], marker="o", markersize=5, color="#555555",
                                transform=self.fig.transFigure)
                self._only_in(self.fig.add_artist(marker), phase, step=step)
                index += 1


@functools.lru_cache(maxsize=8)
def _legend_pixels(num_classes: int) -> np.ndarray:
    """The legend and the class colour strip as an RGB bitmap (drawn once per class count)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    fig = Figure(figsize=(LEGEND_BOX[2] * FIGSIZE[0], LEGEND_BOX[3] * FIGSIZE[1]), dpi=DPI)
    canvas = FigureCanvasAgg(fig)
    handles = [
        Line2D([], [], color=PULSE_COLOR, lw=3, label="training (ring = wall time)"),
        Line2D([], [], color=UPDATE_COLOR, lw=3, label="update (width = p_j)"),
        Line2D([], [], color=DROP_COLOR, lw=3, label="dropped reply"),
        Line2D([], [], color=MODEL_COLOR, lw=3, label="new global model"),
        Line2D([], [], color=FAIL_COLOR, lw=0, marker="X", label="failed client"),
    ]
    fig.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 0.0), fontsize=6,
               ncol=2, frameon=False, handlelength=1.5, borderaxespad=0.2)
    if num_classes:
        fig.text(0.01, 0.86, "pie = label histogram, class:", fontsize=6, va="center")
        width = min(0.09, 0.98 / num_classes)
        for c, color in enumerate(class_colors(num_classes)):
            x = 0.01 + c * width
            fig.add_artist(Rectangle((x, 0.58), width * 0.9, 0.17, fc=color, lw=0,
                                     transform=fig.transFigure))
            if num_classes <= 20:
                fig.text(x + width * 0.45, 0.665, str(c), fontsize=5, ha="center",
                         va="center", color="white")
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _fit(pixels: np.ndarray | None, box: tuple[int, int]) -> np.ndarray | None:
    """An image scaled (area-averaged) to fit a (width, height) box, aspect kept."""
    from PIL import Image

    if pixels is None:
        return None
    scale = min(box[0] / pixels.shape[1], box[1] / pixels.shape[0])
    size = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX))


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


def drawn_clients(run: RunView, view: RoundView) -> tuple[Client, ...]:
    """The clients a round's frames draw.

    Every client of the run, in fixed places, while the run has at most
    MAX_FIXED_CLIENTS; beyond that only the clients that replied in this
    round, drawn from their replies, so the round's frames (and their cache)
    do not depend on the clients of later rounds.
    """
    if len(run.clients) <= MAX_FIXED_CLIENTS:
        return run.clients
    return _clients({view.server_round: list(view.replies)})


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


def read_image(path: Path) -> np.ndarray | None:
    """A sample grid as an (H, W, 3) array; None, with a warning naming it, when unreadable."""
    import imageio.v3 as iio

    try:
        return iio.imread(path, plugin="pillow", mode="RGB")
    except Exception as exc:  # noqa: BLE001 - Pillow raises several kinds for a bad file
        log(WARNING, "sample grid %s cannot be read (%s: %s); skipped", path,
            type(exc).__name__, exc)
        return None


def read_csv_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a run CSV ([] when missing), each with its round as int under '__round'.

    A row without an integer 'round' is skipped with a warning naming the file and line.
    """
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            server_round = _number(row.get("round"))
            if server_round is None or server_round != int(server_round):
                log(WARNING, "%s line %d: no integer 'round'; row skipped", path, line)
                continue
            rows.append({**row, "__round": int(server_round)})
    return rows


def read_run_config(path: Path) -> dict[str, Any]:
    """run_config.json as a dict ({} when missing or unreadable)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _number(cell: Any) -> float | None:
    """A finite float from a CSV cell, or None."""
    try:
        value = float(cell)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _numeric_cells(row: dict[str, Any]) -> dict[str, float]:
    """The numeric cells of a metrics row."""
    return {k: v for k, cell in row.items()
            if k not in ("round", "__round") and (v := _number(cell)) is not None}


def _reply(row: dict[str, Any], node_to_key: dict[str, str]) -> Reply:
    """A Reply from a clients.csv row; missing contract columns mean 'accepted'."""
    pid = _number(row.get("partition-id"))
    node = row.get("node-id") or ""
    key = f"p{int(pid)}" if pid is not None else node_to_key.get(node, f"node {node or '?'}")
    status = (row.get("status") or "accepted").strip().lower()
    if status not in _STATUSES:
        status = "dropped"  # an unknown status is not an accepted update
    examples = _number(row.get("num-examples"))
    return Reply(
        client=key,
        status=status,
        reason=(row.get("reason") or "").strip(),
        num_examples=int(examples) if examples is not None else None,
        weight=_number(row.get("weight")) or 0.0,
        wall_time_s=_number(row.get("wall-time-s")),
        histogram=_histogram(row.get("label-histogram")),
        loss_d=_number(row.get("loss-d")),
        loss_g=_number(row.get("loss-g")),
    )


def _with_weights(replies: list[Reply]) -> list[Reply]:
    """Fill p_j = n_j / sum n over accepted replies when clients.csv has no weights."""
    accepted = [r for r in replies if r.status == "accepted"]
    if any(r.weight > 0 for r in accepted):
        return replies
    total = sum(r.num_examples or 0 for r in accepted)
    return [
        replace(r, weight=(r.num_examples or 0) / total)
        if r.status == "accepted" and total > 0 else r
        for r in replies
    ]


def _histogram(cell: str | None) -> tuple[int, ...] | None:
    """Class counts from 'n0;n1;...', None when empty or malformed."""
    if not cell:
        return None
    try:
        counts = tuple(int(float(x)) for x in cell.split(";"))
    except ValueError:
        return None
    return counts if counts and all(c >= 0 for c in counts) and sum(counts) > 0 else None


def _clients(by_round: dict[int, list[Reply]]) -> tuple[Client, ...]:
    """Every client of the run with its latest known data size and histogram."""
    known: dict[str, Client] = {}
    for server_round in sorted(by_round):
        for reply in by_round[server_round]:
            old = known.get(reply.client)
            known[reply.client] = Client(
                key=reply.client,
                label=reply.client if reply.client.startswith("node") else
                f"client {reply.client[1:]}",
                num_examples=reply.num_examples or (old.num_examples if old else None),
                histogram=reply.histogram or (old.histogram if old else None),
            )

    def order(client: Client) -> tuple[int, float]:
        """Partitions by number first, then nodes by id."""
        if client.key.startswith("p"):
            return 0, float(client.key[1:])
        return 1, _number(client.key.split()[-1]) or 0.0

    return tuple(sorted(known.values(), key=order))


def _sample_grids(folder: Path) -> dict[int, Path]:
    """Round -> samples/round_NNNN.png."""
    grids = {}
    for path in folder.glob("round_*.png"):
        stem = path.stem.removeprefix("round_")
        if stem.isdigit():
            grids[int(stem)] = path
    return dict(sorted(grids.items()))


def _positions(clients: Sequence[Client]) -> dict[str, tuple[float, float]]:
    """Clients evenly on a circle around the server, clockwise from the upper left.

    Starting half a step left of the top puts two clients left and right,
    where the picture is widest, and four on the diagonals.
    """
    n = max(1, len(clients))
    angles = [math.pi / 2 + math.pi / n - 2 * math.pi * i / n for i in range(n)]
    return {
        c.key: (_CLIENT_RING * math.cos(a), _CLIENT_RING * math.sin(a))
        for c, a in zip(clients, angles, strict=True)
    }


def _client_radius(client: Client, clients: Sequence[Client]) -> float:
    """Radius with area proportional to the client's examples, capped by spacing."""
    largest = max((c.num_examples or 0) for c in clients) or 1
    share = (client.num_examples or largest * 0.5) / largest
    cap = 0.55 * _CLIENT_RING * math.sin(math.pi / max(2, len(clients)))
    return min(0.07 + 0.09 * math.sqrt(share), cap)


def _pie(center: tuple[float, float], radius: float, histogram: tuple[int, ...] | None,
         num_classes: int) -> list[Any]:
    """Wedges of a client's label shares (one grey disc when unknown)."""
    from matplotlib.patches import Circle, Wedge

    if not histogram:
        return [Circle(center, radius, color=UNKNOWN_DATA_COLOR, zorder=2)]
    colors = class_colors(max(num_classes, len(histogram)))
    total = sum(histogram)
    wedges, start = [], 90.0
    for c, count in enumerate(histogram):
        if count == 0:
            continue
        sweep = 360.0 * count / total
        wedges.append(Wedge(center, radius, start, start + sweep, facecolor=colors[c],
                            edgecolor="white", lw=0.4, zorder=2))
        start += sweep
    return wedges


def class_colors(n: int) -> list[Any]:
    """N distinct class colours (tab10, tab20, then a hue circle), as RGBA tuples."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["hsv"](i / n) for i in range(n)]


def _progress(wall: float | None, slowest: float, elapsed_share: float) -> float:
    """Share of a client's ring drawn when elapsed_share of the slowest time has passed."""
    if wall is None or slowest <= 0:
        return 0.0
    return min(1.0, elapsed_share * slowest / max(wall, 1e-9))


def _towards(a: tuple[float, float], b: tuple[float, float], t: float) -> tuple[float, float]:
    """The point t of the way from a to b."""
    return a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t


def _label_place(center: tuple[float, float], radius: float) -> tuple[float, float, str]:
    """(x, y, va) of a client's name: below a client in the lower half, else above."""
    if center[1] < -0.05:
        return center[0], center[1] - radius - 0.07, "top"
    return center[0], center[1] + radius + 0.07, "bottom"


def _note_place(center: tuple[float, float], radius: float) -> tuple[float, float, str]:
    """(x, y, va) of a client's note (drop reason, failure), beyond its name.

    Outward from the server (above in the upper half, below in the lower half,
    below for a client level with it), so a note never covers the arrows.
    """
    if center[1] > 0.05:
        return center[0], center[1] + radius + 0.17, "bottom"
    if center[1] < -0.05:
        return center[0], center[1] - radius - 0.17, "top"
    return center[0], center[1] - radius - 0.07, "top"


def _wrap(text: str, width: int, lines: int = 2) -> str:
    """Text wrapped to ``width`` columns, at most ``lines`` lines (then an ellipsis)."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width, max_lines=lines, placeholder="…"))


def _metrics_line(metrics: dict[str, float]) -> str:
    """'loss D 0.47  G 2.58 | D(x) 0.84  D(G(z)) 0.16 | fid 239' from a metrics row."""
    parts = []
    if "loss-d" in metrics or "loss-g" in metrics:
        parts.append(f"loss D {metrics.get('loss-d', math.nan):.3f}  "
                     f"G {metrics.get('loss-g', math.nan):.3f}")
    if "d-x" in metrics or "d-gz" in metrics:
        parts.append(f"D(x) {metrics.get('d-x', math.nan):.2f}  "
                     f"D(G(z)) {metrics.get('d-gz', math.nan):.2f}")
    if "fid" in metrics:
        parts.append(f"fid {metrics['fid']:.3g}")
    return " | ".join(parts) or "no metrics for this round"


def _counts_line(view: RoundView) -> str:
    """'3 accepted, 1 dropped, 0 failed' from the replies (or the metrics row)."""
    m = view.metrics
    # Contract rows name every dropped and failed reply; older rows only the accepted
    # ones, and then the metrics row has the counts.
    if not m or any(r.status != "accepted" for r in view.replies):
        counts = {s: sum(1 for r in view.replies if r.status == s) for s in _STATUSES}
    else:
        counts = {"accepted": int(m.get("replies-accepted", len(view.replies))),
                  "dropped": int(m.get("replies-dropped", 0)),
                  "failed": int(m.get("replies-failed", 0))}
    text = ", ".join(f"{n} {s}" for s, n in counts.items())
    if "round-time-s" in m:
        text += f" | round {m['round-time-s']:.1f} s"
    return text


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
    if run_dir.is_dir() and not any((run_dir / n).is_file()
                                    for n in ("metrics.csv", "clients.csv")):
        print(f"fedgan animate: {run_dir} has neither metrics.csv nor clients.csv: "
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
