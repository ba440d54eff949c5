"""The federation animation's drawing: one round on one matplotlib Figure.

`RoundFigure` draws a round of a `RunView` in the layout of
`fedgan_app.outputs.animation_layout`, and renders its frames, one per step of
each phase; `fedgan_app.outputs.animation` turns them into federation.gif.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedgan_app.outputs.animation_layout import (
    AGGREGATE_COLOR,
    DIAGRAM_BOX,
    DPI,
    DROP_COLOR,
    FAIL_COLOR,
    FIGSIZE,
    FRAMES_PER_ROUND,
    INSET_BOX,
    LEGEND_BOX,
    MODEL_COLOR,
    PHASES,
    PULSE_COLOR,
    SERVER_COLOR,
    SERVER_RADIUS,
    UPDATE_COLOR,
    client_radius,
    counts_line,
    fit,
    label_place,
    legend_pixels,
    metrics_line,
    note_place,
    pie,
    positions,
    ring_share,
    towards,
    wrap,
)
from fedgan_app.outputs.runfolder import read_image
from fedgan_app.outputs.runview import Client, Reply, RoundView, RunView, drawn_clients


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
    arrows, halo, inset), instead of drawing each frame anew.

    """

    def __init__(self, run: RunView, view: RoundView) -> None:
        """Draw the round: the background every frame shares, and each frame's artists."""
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
        self._positions = positions(self.clients)
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
        self.fig.text(0.25, 0.955, metrics_line(view.metrics), fontsize=8, va="center")
        self.fig.text(0.25, 0.905, counts_line(view), fontsize=8, va="center",
                      color="#444444")

    def _draw_server(self) -> None:
        """The server; its amber halo is the aggregate phase."""
        from matplotlib.patches import Circle, Wedge

        # A ring, not a disc: frames draw it over the background, it must not hide the server.
        halo = Wedge((0, 0), SERVER_RADIUS * 1.7, 0, 360, width=SERVER_RADIUS * 0.65,
                     color=AGGREGATE_COLOR, lw=0)
        self._only_in(self.ax.add_patch(halo), "aggregate")
        self.ax.add_patch(Circle((0, 0), SERVER_RADIUS, color=SERVER_COLOR, zorder=3))
        self.ax.text(0, 0, "server", color="white", ha="center", va="center", fontsize=8,
                     zorder=4)
        accepted = sum(1 for r in self.view.replies if r.status == "accepted")
        rule = self.run.aggregation or "aggregate"
        self._only_in(self.ax.text(
            0, -SERVER_RADIUS * 1.7 - 0.08, f"{rule}: {accepted} update(s)",
            ha="center", va="top", fontsize=7, zorder=5,
        ), "aggregate")

    def _draw_client(self, client: Client) -> None:
        """A client's pie, its training ring, and its arrows for every phase."""
        from matplotlib.patches import Wedge

        center = self._positions[client.key]
        radius = client_radius(client, self.clients)
        reply = self._replies.get(client.key)
        alpha = 1.0 if reply is not None else 0.25  # not sampled this round: faded
        for wedge in pie(center, radius, client.histogram, self.run.num_classes):
            wedge.set_alpha(alpha)
            self.ax.add_patch(wedge)
        # Its name (and wall time) on the side away from the server, clear of arrows.
        label = client.label if len(self.clients) <= 6 else client.key.removeprefix("p")
        if reply is not None and reply.wall_time_s is not None:
            label += f" · {reply.wall_time_s:.1f} s"
        x, y, va = label_place(center, radius)
        self.ax.text(x, y, label, ha="center", va=va, fontsize=7, alpha=alpha)
        if reply is None:
            x, y, va = note_place(center, radius)
            self.ax.text(x, y, "no reply", ha="center", va=va, fontsize=6.5, color="#999999")
            return
        if reply.status == "failed":
            self._draw_failed(center, radius, reply)
            return
        # Training: a ring that closes when this client is done (wall-time share).
        slowest = max((r.wall_time_s or 0.0) for r in self.view.replies)
        steps = dict(PHASES)["train"]
        for step in range(steps):
            share = ring_share(reply.wall_time_s, slowest, (step + 1) / steps)
            if share > 0:
                ring = Wedge(center, radius + 0.045, 90 - 360 * share, 90, width=0.03,
                             color=PULSE_COLOR, lw=0, gid=f"pulse:{client.key}")
                self._only_in(self.ax.add_patch(ring), "train", step=step)
        if reply.status == "dropped":
            self._draw_dropped(center, radius, reply)
        else:
            self._draw_update(center, radius, reply)
        self._only_in(self._arrow((0, 0), center, SERVER_RADIUS, radius + 0.02,
                                  MODEL_COLOR, 2.0, gid=f"model:{client.key}"), "broadcast")

    def _draw_update(self, center: tuple[float, float], radius: float, reply: Reply) -> None:
        """A red arrow to the server, its width proportional to p_j."""
        width = 0.8 + 9.0 * reply.weight
        self._only_in(self._arrow(center, (0, 0), radius + 0.02, SERVER_RADIUS + 0.02,
                                  UPDATE_COLOR, width, gid=f"update:{reply.client}"),
                      "upload")
        # The weight beside the arrow's middle, on its clockwise side.
        mid = towards(center, (0.0, 0.0), 0.5)
        norm = math.hypot(*center) or 1.0
        side = (-center[1] / norm * 0.13, center[0] / norm * 0.13)
        self._only_in(self.ax.text(mid[0] + side[0], mid[1] + side[1],
                                   f"p={reply.weight:.2f}", fontsize=6.5, ha="center",
                                   va="center", color=UPDATE_COLOR, zorder=6), "upload")

    def _draw_dropped(self, center: tuple[float, float], radius: float, reply: Reply) -> None:
        """A magenta arrow that stops halfway, a cross, and the reason."""
        from matplotlib.lines import Line2D

        end = towards(center, (0.0, 0.0), 0.55)
        arrow = self._arrow(center, end, radius + 0.02, 0.0, DROP_COLOR, 3.0, style="-",
                            gid=f"dropped:{reply.client}")
        stop = Line2D([end[0]], [end[1]], marker="X", markersize=11, color=DROP_COLOR,
                      zorder=6)
        self._only_in(arrow, "upload")
        self._only_in(self.ax.add_line(stop), "upload")
        # The reason stays up while the server aggregates without this reply.
        x, y, va = note_place(center, radius)
        self._only_in(self.ax.text(x, y, wrap("dropped: " + (reply.reason or "(no reason)"), 30),
                                   ha="center", va=va, fontsize=6.5, color=DROP_COLOR,
                                   weight="bold", zorder=6), "upload", "aggregate")

    def _draw_failed(self, center: tuple[float, float], radius: float, reply: Reply) -> None:
        """A black cross over the client and the word 'failed', in every phase."""
        from matplotlib.lines import Line2D

        self.ax.add_line(Line2D([center[0]], [center[1]], marker="X", markersize=18,
                                color=FAIL_COLOR, markeredgecolor="white", zorder=7,
                                gid=f"failed:{reply.client}"))
        x, y, va = note_place(center, radius)
        self.ax.text(x, y, wrap("failed" + (": " + reply.reason if reply.reason else ""), 30),
                     ha="center", va=va, fontsize=6.5, color=FAIL_COLOR, weight="bold")

    def _arrow(self, start: tuple[float, float], end: tuple[float, float], start_gap: float,
               end_gap: float, color: str, width: float, style: str = "-|>",
               gid: str | None = None) -> Any:
        """An arrow from start to end, shortened by the gaps at both ends."""
        from matplotlib.patches import FancyArrowPatch

        length = math.dist(start, end)
        a = towards(start, end, start_gap / length)
        b = towards(start, end, 1 - end_gap / length)
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
            pixels = fit(read_image(path), box) if path is not None else None
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
        pixels = legend_pixels(self.run.num_classes)
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
