"""The federation animation's frame layout: phases, places, sizes, colours, captions.

A round is drawn in :data:`PHASES`: the clients train (a ring sweeps around each
client, closing when it finishes: its length is the client's wall time relative
to the slowest), the updates go to the server (red arrows, width proportional to
p_j; dropped replies in magenta with their reason; failed clients crossed out),
the server aggregates, and the new model goes back out (blue arrows). Each client
is a pie of its label histogram (grey when unknown) whose area is proportional to
its number of examples, so non-IID data is visible at a glance.

This module holds where each thing goes and what colour it is; the drawing is
`fedgan_app.outputs.animation_figure`, the GIF `fedgan_app.outputs.animation`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedgan_app.outputs.runview import STATUSES, Client, RoundView

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
CLIENT_RING = 0.8  # clients sit on a circle of this radius around the server
SERVER_RADIUS = 0.17


def positions(clients: Sequence[Client]) -> dict[str, tuple[float, float]]:
    """Clients evenly on a circle around the server, clockwise from the upper left.

    Starting half a step left of the top puts two clients left and right,
    where the picture is widest, and four on the diagonals.
    """
    n = max(1, len(clients))
    angles = [math.pi / 2 + math.pi / n - 2 * math.pi * i / n for i in range(n)]
    return {
        c.key: (CLIENT_RING * math.cos(a), CLIENT_RING * math.sin(a))
        for c, a in zip(clients, angles, strict=True)
    }


def client_radius(client: Client, clients: Sequence[Client]) -> float:
    """Radius with area proportional to the client's examples, capped by spacing."""
    largest = max((c.num_examples or 0) for c in clients) or 1
    share = (client.num_examples or largest * 0.5) / largest
    cap = 0.55 * CLIENT_RING * math.sin(math.pi / max(2, len(clients)))
    return min(0.07 + 0.09 * math.sqrt(share), cap)


def pie(center: tuple[float, float], radius: float, histogram: tuple[int, ...] | None,
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


def ring_share(wall: float | None, slowest: float, elapsed_share: float) -> float:
    """Share of a client's ring drawn when elapsed_share of the slowest time has passed."""
    if wall is None or slowest <= 0:
        return 0.0
    return min(1.0, elapsed_share * slowest / max(wall, 1e-9))


def towards(a: tuple[float, float], b: tuple[float, float], t: float) -> tuple[float, float]:
    """The point t of the way from a to b."""
    return a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t


def label_place(center: tuple[float, float], radius: float) -> tuple[float, float, str]:
    """(x, y, va) of a client's name: below a client in the lower half, else above."""
    if center[1] < -0.05:
        return center[0], center[1] - radius - 0.07, "top"
    return center[0], center[1] + radius + 0.07, "bottom"


def note_place(center: tuple[float, float], radius: float) -> tuple[float, float, str]:
    """(x, y, va) of a client's note (drop reason, failure), beyond its name.

    Outward from the server (above in the upper half, below in the lower half,
    below for a client level with it), so a note never covers the arrows.
    """
    if center[1] > 0.05:
        return center[0], center[1] + radius + 0.17, "bottom"
    if center[1] < -0.05:
        return center[0], center[1] - radius - 0.17, "top"
    return center[0], center[1] - radius - 0.07, "top"


def wrap(text: str, width: int, lines: int = 2) -> str:
    """Text wrapped to ``width`` columns, at most ``lines`` lines (then an ellipsis)."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width, max_lines=lines, placeholder="…"))


def metrics_line(metrics: dict[str, float]) -> str:
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


def counts_line(view: RoundView) -> str:
    """'3 accepted, 1 dropped, 0 failed' from the replies (or the metrics row)."""
    m = view.metrics
    # Contract rows name every dropped and failed reply; older rows only the accepted
    # ones, and then the metrics row has the counts.
    if not m or any(r.status != "accepted" for r in view.replies):
        counts = {s: sum(1 for r in view.replies if r.status == s) for s in STATUSES}
    else:
        counts = {"accepted": int(m.get("replies-accepted", len(view.replies))),
                  "dropped": int(m.get("replies-dropped", 0)),
                  "failed": int(m.get("replies-failed", 0))}
    text = ", ".join(f"{n} {s}" for s, n in counts.items())
    if "round-time-s" in m:
        text += f" | round {m['round-time-s']:.1f} s"
    return text

@functools.lru_cache(maxsize=8)
def legend_pixels(num_classes: int) -> np.ndarray:
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

def fit(pixels: np.ndarray | None, box: tuple[int, int]) -> np.ndarray | None:
    """An image scaled (area-averaged) to fit a (width, height) box, aspect kept."""
    from PIL import Image

    if pixels is None:
        return None
    scale = min(box[0] / pixels.shape[1], box[1] / pixels.shape[0])
    size = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX))
