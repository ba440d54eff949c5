"""The dashboard page of a run folder: dashboard.html and its version, dashboard.json.

The page is plain HTML with relative links into the run folder: no server-side
code, no network, nothing to install. Served (``python -m fedgan_app.outputs.dashboard``,
``./fedgan.sh dashboard``), it polls ``dashboard.json`` every two seconds and
reloads itself when a round has rewritten the page; opened as a file, it reloads
every ten seconds. It works the same during the run and long after it.
"""

from __future__ import annotations

import hashlib
import html
import math
from datetime import datetime
from pathlib import Path
from typing import Any

from fedgan_app.files import write_json, write_text
from fedgan_app.outputs.animation_layout import class_colors
from fedgan_app.outputs.runfolder import (
    DASHBOARD_STATE,
    LOSSES_PLOT,
    QUALITY_PLOT,
    ROUND_KEY,
    RunFolder,
    newest_sample,
)
from fedgan_app.outputs.runview import AnimationError, Reply, RunView, load_run

POLL_MS = 2000
GRID_SCALE = 2  # sample grids are small: shown at twice their size, pixel for pixel


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
    folder = RunFolder(run_dir)
    body = _page_html(folder)
    version = hashlib.sha256(body.encode()).hexdigest()[:16]
    write_text(folder.dashboard_html, body.replace("__VERSION__", version))
    metric_rows = folder.metrics_rows()
    state = {"version": version, "round": metric_rows[-1][ROUND_KEY] if metric_rows else 0,
             "updated": datetime.now().isoformat(timespec="seconds")}
    write_json(folder.dashboard_json, state)
    return folder.dashboard_html


def _page_html(folder: RunFolder) -> str:
    """The whole page (its version left as __VERSION__)."""
    run_dir = folder.path
    config = folder.config()
    metric_rows = folder.metrics_rows()
    last = metric_rows[-1] if metric_rows else None
    planned = config.get("num-server-rounds")
    done = last[ROUND_KEY] if last else 0
    status = ("finished" if isinstance(planned, int) and done >= planned
              else "waiting for round 1" if not last else "running")
    try:
        run = load_run(run_dir)
    except AnimationError:
        run = None
    grid_round, grid = newest_sample(run_dir)
    class_round, class_grid = newest_sample(run_dir, per_class=True)

    panels = [_image_panel(run_dir, grid, f"samples after round {grid_round}", "grid",
                           GRID_SCALE)]
    if class_grid is not None:
        panels.append(_image_panel(run_dir, class_grid,
                                   f"one row per class, round {class_round}", "class-grid",
                                   GRID_SCALE))
    panels.append(_image_panel(run_dir, _file(folder.federation_gif),
                               "the federation, round by round", "federation"))
    curves = [_image_panel(run_dir, _file(folder.plot(name)), title, f"plot-{key}")
              for key, name, title in (("losses", LOSSES_PLOT, "losses and D outputs"),
                                       ("quality", QUALITY_PLOT, "sample quality"))]
    name = html.escape(run_dir.name)
    total = f" of {planned}" if isinstance(planned, int) else ""
    return _TEMPLATE.format(
        title=f"fedgan · {name}",
        name=name,
        round=done,
        progress=f"round {done}{total}{_privacy_text(last)}",
        status=status,
        updated=datetime.now().strftime("%H:%M:%S"),
        panels="\n".join(panels),
        curves="\n".join(curves),
        metrics=_metrics_table(last),
        clients=_clients_table(run) if run is not None else "<p>no client rows yet</p>",
        audit=_audit_table(folder.summary()),
        progress_gif=_image_panel(run_dir, _file(folder.progress_gif),
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


def _privacy_text(row: dict[str, Any] | None) -> str:
    """' · epsilon E' for a differentially private run's latest row ('' otherwise)."""
    epsilon = (row or {}).get("dp-epsilon")
    if epsilon in (None, ""):
        return ""
    return f" · privacy spent: epsilon {_fmt(epsilon)}"


def _metrics_table(row: dict[str, Any] | None) -> str:
    """The latest metrics.csv row as a two-column table."""
    if row is None:
        return "<p>no round finished yet</p>"
    cells = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>"
        for k, v in row.items() if k not in (ROUND_KEY,) and v not in ("", None)
    )
    return f'<table class="metrics">{cells}</table>'


# The leakage audit's headline values (summary.json "audit/..."), as the page shows them.
_AUDIT_ROWS = (
    ("memorization/closer-to-train-excess",
     "preference for training data (0: none, 1: copies)"),
    ("memorization/near-copies", "near-copies of training images"),
    ("memorization/real-near-copies", "real held-out digits that near (reference)"),
    ("membership/auc", "membership AUC (0.5: chance)"),
    ("membership/auc-max-client", "membership AUC, most exposed client"),
)


def _audit_table(summary: dict[str, Any]) -> str:
    """The leakage audit's headline values, when the run has been audited."""
    cells = "".join(
        f"<tr><th>{html.escape(label)}</th><td>{html.escape(_fmt(summary[f'audit/{key}']))}"
        "</td></tr>"
        for key, label in _AUDIT_ROWS if isinstance(summary.get(f"audit/{key}"), (int, float))
    )
    if not cells:
        return ""
    return f'<h2>leakage audit</h2>\n<table class="metrics" id="audit">{cells}</table>'


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
{audit}
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
""".replace("{state}", DASHBOARD_STATE)

