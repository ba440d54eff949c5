"""Run tracking: every file under ``outputs/<run>/`` (except checkpoints) and W&B.

This is the only module that does logging I/O. Layout written into ``run_dir``::

    run_config.json          the full config of the run
    metrics.csv              one row per server round ("round" first)
    clients.csv              one row per client per round ("round" first)
    samples/round_NNNN.png   sample grid of the fixed noise batch
    samples/classes_round_NNNN.png  per-class grid (conditional runs)
    summary.json             final summary values
    wandb/                   the W&B run folder (offline unless chosen otherwise)

The views of those files (plots/, progress.gif, federation.gif, dashboard.html)
are written by ``fedgan_app.dashboard.refresh_run`` after every round and again
at :meth:`RunTracker.finish`, which also logs the animations and the clients
table to W&B.

Every file is written to a temp file and renamed, so a crash never leaves a half
file behind. W&B is best effort: its first failure is logged once as a warning,
W&B is switched off for the rest of the run, and local outputs keep coming.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common.logger import log

WANDB_MODES = ("offline", "online", "disabled")
_SAMPLE_RE = re.compile(r"^(?:classes_)?round_(\d+)\.png$")


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into one uint8 RGB image (H', W', 3).

    Same geometry as ``torchvision.utils.make_grid`` (which does not import here):
    ``min(nrow, N)`` columns, ``padding`` black pixels around and between tiles.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1|3, H, W), got {tuple(images.shape)}")
    if nrow < 1 or padding < 0:
        raise ValueError(f"need nrow >= 1 and padding >= 0, got {nrow=}, {padding=}")
    imgs = images.detach().to("cpu", torch.float32)
    if imgs.shape[1] == 1:
        imgs = imgs.expand(-1, 3, -1, -1)  # grayscale -> RGB so every grid is (H, W, 3)
    # [-1, 1] (tanh output) -> [0, 255]; clamp so overshoot cannot wrap around in uint8
    pixels = ((imgs.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    n, _, h, w = pixels.shape
    ncols = min(nrow, n)
    nrows = math.ceil(n / ncols)
    grid = torch.zeros(
        (nrows * (h + padding) + padding, ncols * (w + padding) + padding, 3),
        dtype=torch.uint8,
    )
    for i in range(n):
        top = (i // ncols) * (h + padding) + padding
        left = (i % ncols) * (w + padding) + padding
        grid[top : top + h, left : left + w] = pixels[i].permute(1, 2, 0)  # CHW -> HWC
    return grid.numpy()


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temp file beside ``path``, then rename it onto it."""
    # Same folder, so os.replace is an atomic rename; same suffix, so writers that
    # infer the format from the name (Pillow, imageio, matplotlib) still work.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _json_default(value: Any) -> Any:
    """Turn numpy/torch scalars and paths into JSON values; anything else into str."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _format_value(value: Any) -> str:
    """Format one CSV cell: bools as 0/1, ints as is, floats with repr, None empty."""
    if value is None:
        return ""
    if hasattr(value, "item") and not isinstance(value, str):
        # numpy/torch scalar -> Python scalar (repr would say np.float64(...))
        value = value.item()
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # shortest string that round-trips exactly
    return str(value)


def _parse_value(cell: str) -> int | float | str | None:
    """Parse a CSV cell back into a number where it is one (plots, W&B table)."""
    if cell == "":
        return None
    for kind in (int, float):
        try:
            return kind(cell)
        except ValueError:
            pass
    return cell


def _wandb_scalar(value: Any) -> float | int | None:
    """Return ``value`` as a W&B scalar, or None when it is not a number."""
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return value
    return None


class _CsvTable:
    """Rows of string cells with a growing union of columns, rewritten atomically."""

    def __init__(self, path: Path) -> None:
        """Start an empty table that will be written to ``path``."""
        self.path = path
        self.columns: list[str] = ["round"]
        self.rows: list[dict[str, str]] = []

    def load(self, keep_up_to_round: int) -> int:
        """Load ``path``, keeping rounds <= ``keep_up_to_round``; return # dropped."""
        if not self.path.exists():
            return 0
        with self.path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            read = list(reader)
        kept = [
            row for row in read if _round_of(row) is not None and _round_of(row) <= keep_up_to_round
        ]
        self.columns = ["round", *[c for c in columns if c != "round"]]
        self.rows = [{c: row.get(c) or "" for c in self.columns} for row in kept]
        return len(read) - len(kept)

    def add(self, server_round: int, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append rows for ``server_round``, widening the columns with any new keys."""
        for row in rows:
            cells = {"round": str(server_round)}
            for key, value in row.items():
                if key == "round":
                    # The round argument is the truth, not a stray key in the row.
                    continue
                if key not in self.columns:
                    self.columns.append(key)
                cells[key] = _format_value(value)
            self.rows.append(cells)

    def write(self) -> None:
        """Rewrite the whole file atomically (a crash leaves the previous full file)."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        _write_text_atomic(self.path, buf.getvalue())

    def column(self, name: str) -> tuple[list[int], list[float]]:
        """Return (rounds, values) of the numeric cells of column ``name``."""
        rounds, values = [], []
        for row in self.rows:
            value = _parse_value(row.get(name, ""))
            if isinstance(value, int | float):
                rounds.append(int(row["round"]))
                values.append(float(value))
        return rounds, values


def _round_of(row: Mapping[str, str | None]) -> int | None:
    """Return the integer round of a CSV row, None when the cell is malformed."""
    try:
        return int(row.get("round") or "")
    except ValueError:
        return None


class RunTracker:
    """Writes the outputs of one run to ``run_dir`` and mirrors them to W&B.

    Parameters
    ----------
    run_dir : Path
        Folder of the run (``outputs/<run>``); created if missing.
    config : dict[str, Any]
        Full run configuration; written to ``run_config.json`` and W&B config.
    wandb_mode : str
        ``"offline"`` (default), ``"online"`` or ``"disabled"`` (W&B not imported).
    wandb_project : str
        W&B project name.
    run_name : str | None
        W&B display name; W&B picks one when None.
    wandb_run_id : str | None
        Id of an earlier W&B run to continue (from a checkpoint); new run when None.
    resume_after_round : int | None
        When resuming from a checkpoint of round R: keep the rows of rounds <= R
        already on disk, drop later ones (written by the crashed run after its
        last checkpoint), so the resumed run appends without duplicates.
    wandb_init_timeout_s : float | None
        Seconds ``wandb.init`` may wait for the server (online mode); W&B's
        default (90 s) when None.

    """

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        wandb_mode: str = "offline",
        wandb_project: str = "fedgan",
        run_name: str | None = None,
        wandb_run_id: str | None = None,
        resume_after_round: int | None = None,
        *,
        wandb_init_timeout_s: float | None = None,
    ) -> None:
        """Create run_dir, write run_config.json, reload a resumed run, start W&B."""
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"wandb_mode must be one of {WANDB_MODES}, got {wandb_mode!r}")
        self._run_dir = Path(run_dir)
        self._samples_dir = self._run_dir / "samples"
        self._plots_dir = self._run_dir / "plots"
        for folder in (self._run_dir, self._samples_dir, self._plots_dir):
            folder.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(
            self._run_dir / "run_config.json",
            json.dumps(config, indent=2, sort_keys=True, default=_json_default) + "\n",
        )
        self._metrics = _CsvTable(self._run_dir / "metrics.csv")
        self._clients = _CsvTable(self._run_dir / "clients.csv")
        self._samples: dict[int, Path] = {}
        self._summary: dict[str, Any] = {}
        self._pending_events: dict[str, int] = {}
        self._event_totals: dict[str, int] = {}
        self._finished = False
        if resume_after_round is not None:
            self._load_previous(resume_after_round)

        # W&B state: the module and run stay None when disabled or after a failure.
        self._wandb: Any = None
        self._run: Any = None
        self._wandb_run_id: str | None = None
        self._wandb_warned = False
        if wandb_mode != "disabled":
            self._start_wandb(
                config,
                wandb_mode,
                wandb_project,
                run_name,
                wandb_run_id,
                wandb_init_timeout_s,
            )

    @property
    def wandb_run_id(self) -> str | None:
        """Id of the W&B run (for checkpoints); None when W&B is off or init failed."""
        return self._wandb_run_id

    @property
    def run_dir(self) -> Path:
        """Folder this tracker writes into."""
        return self._run_dir

    def log_round(self, server_round: int, metrics: Mapping[str, float | int]) -> None:
        """Append a row to metrics.csv (new keys: new columns); W&B ``global/<key>``.

        Event counts recorded with :meth:`log_event` since the last call are
        folded into this row (a key in ``metrics`` wins over an event of the same name).
        """
        row = {**self._pending_events, **metrics}
        self._pending_events = {}
        self._metrics.add(server_round, [row])
        self._metrics.write()
        self._wandb_log(server_round, {f"global/{k}": v for k, v in row.items()})

    def log_clients(self, server_round: int, rows: list[dict[str, Any]]) -> None:
        """Append a row per client to clients.csv; W&B ``client/<partition>/<key>``."""
        self._clients.add(server_round, rows)
        self._clients.write()
        scalars: dict[str, Any] = {}
        for index, row in enumerate(rows):
            # Name series by partition id, stable across rounds; reply index otherwise.
            client = row.get("partition-id", f"reply-{index}")
            scalars.update(
                {f"client/{client}/{k}": v for k, v in row.items() if k != "partition-id"}
            )
        self._wandb_log(server_round, scalars)

    def log_samples(self, server_round: int, grid: np.ndarray) -> Path:
        """Write samples/round_NNNN.png (and W&B) from a uint8 (H, W, 3) grid."""
        if grid.dtype != np.uint8 or grid.ndim != 3 or grid.shape[2] != 3:
            raise ValueError(f"grid must be uint8 (H, W, 3), got {grid.dtype} {grid.shape}")
        from PIL import Image

        path = self._samples_dir / f"round_{server_round:04d}.png"
        _atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
        self._samples[server_round] = path
        if self._run is not None:
            self._wandb_call(
                "log of the sample grid",
                lambda: self._run.log(
                    {
                        "round": server_round,
                        "samples/grid": self._wandb.Image(grid, caption=f"round {server_round}"),
                    }
                ),
            )
        return path

    def log_class_samples(self, server_round: int, grid: np.ndarray) -> Path:
        """Write samples/classes_round_NNNN.png (one row per class) and W&B ``samples/classes``.

        The hook for conditional runs: the dashboard shows the newest of these
        files beside the sample grid.
        """
        if grid.dtype != np.uint8 or grid.ndim != 3 or grid.shape[2] != 3:
            raise ValueError(f"grid must be uint8 (H, W, 3), got {grid.dtype} {grid.shape}")
        from PIL import Image

        path = self._samples_dir / f"classes_round_{server_round:04d}.png"
        _atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
        if self._run is not None:
            self._wandb_call(
                "log of the per-class grid",
                lambda: self._run.log(
                    {
                        "round": server_round,
                        "samples/classes": self._wandb.Image(
                            grid, caption=f"one row per class, round {server_round}"
                        ),
                    }
                ),
            )
        return path

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Merge ``summary`` into summary.json and the W&B run summary."""
        self._summary.update(summary)
        _write_text_atomic(
            self._run_dir / "summary.json",
            json.dumps(self._summary, indent=2, sort_keys=True, default=_json_default) + "\n",
        )
        if self._run is not None:
            self._wandb_call("summary update", lambda: self._run.summary.update(dict(summary)))

    def log_event(self, name: str, count: int = 1) -> None:
        """Count an event (e.g. a dropped reply) into the next log_round row."""
        self._pending_events[name] = self._pending_events.get(name, 0) + count
        self._event_totals[name] = self._event_totals.get(name, 0) + count

    def finish(self) -> None:
        """Write event totals and the run's views (plots, GIFs, page), finish W&B; idempotent."""
        if self._finished:
            return
        self._finished = True
        try:
            if self._event_totals:
                self.log_summary({f"total-{name}": n for name, n in self._event_totals.items()})
            from fedgan_app.dashboard import refresh_run  # it reads this module's files

            refresh_run(self._run_dir)
        finally:
            # Close the W&B run even when a local artefact failed, so it is not
            # left running (and unsynced) until the process exits.
            if self._run is not None:
                self._wandb_call("log of the clients table", self._log_clients_table)
                self._wandb_call("log of the animations", self._log_animations)
                # W&B is done: later calls only write local files.
                run, self._run = self._run, None
                self._wandb_call("finish", run.finish)
        log(INFO, "Run outputs written to %s", self._run_dir)

    def _load_previous(self, resume_after_round: int) -> None:
        """Reload rows and grids of rounds <= ``resume_after_round``; drop the rest."""
        dropped_metrics = self._metrics.load(resume_after_round)
        dropped_clients = self._clients.load(resume_after_round)
        # Rewrite now, so the files match the resumed history before the next round.
        self._metrics.write()
        self._clients.write()
        dropped_samples = 0
        for path in self._samples_dir.glob("*round_*.png"):  # per-class grids too
            match = _SAMPLE_RE.match(path.name)
            if match is None:
                continue
            server_round = int(match.group(1))
            if server_round > resume_after_round:
                path.unlink()  # the crashed run's grid; the resumed run writes its own
                dropped_samples += 1
            elif not path.name.startswith("classes_"):
                self._samples[server_round] = path
        log(
            INFO,
            "Resuming after round %d: kept %d metric rows, %d client rows, "
            "%d sample grids; dropped %d, %d, %d of later rounds",
            resume_after_round,
            len(self._metrics.rows),
            len(self._clients.rows),
            len(self._samples),
            dropped_metrics,
            dropped_clients,
            dropped_samples,
        )

    def _start_wandb(
        self,
        config: dict[str, Any],
        mode: str,
        project: str,
        run_name: str | None,
        run_id: str | None,
        init_timeout_s: float | None,
    ) -> None:
        """Import wandb, start (or resume) the run; on failure warn, go on without."""
        try:
            import wandb  # only here: a disabled run never imports W&B

            settings = (
                wandb.Settings(init_timeout=init_timeout_s) if init_timeout_s is not None else None
            )
            run = wandb.init(
                project=project,
                name=run_name,
                config=config,
                dir=str(self._run_dir),  # W&B adds its own wandb/ below this
                mode=mode,
                id=run_id,
                resume="allow" if run_id is not None else None,
                # Each tracker owns its run; never log into another tracker's run.
                reinit="create_new",
                settings=settings,
            )
            # Plot against the server round, not W&B's own step counter, so repeated
            # or out-of-order rounds (resume) are never dropped as "old steps".
            run.define_metric("round")
            for prefix in ("global", "client", "samples"):
                run.define_metric(f"{prefix}/*", step_metric="round")
        except Exception as exc:  # noqa: BLE001 - W&B must never stop training
            self._warn_wandb("init", exc)
            return
        self._wandb, self._run, self._wandb_run_id = wandb, run, run.id

    def _wandb_log(self, server_round: int, values: Mapping[str, Any]) -> None:
        """Log the numeric entries of ``values`` to W&B against ``server_round``."""
        if self._run is None:
            return
        scalars = {k: s for k, v in values.items() if (s := _wandb_scalar(v)) is not None}
        self._wandb_call("log", lambda: self._run.log({"round": server_round, **scalars}))

    def _wandb_call(self, what: str, call: Callable[[], Any]) -> None:
        """Run a W&B call; on any exception warn once and switch W&B off for good."""
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - local files are the record
            self._warn_wandb(what, exc)
            self._run = None

    def _warn_wandb(self, what: str, exc: Exception) -> None:
        """Log the first W&B failure as a warning; later ones would only repeat it."""
        if self._wandb_warned:
            return
        self._wandb_warned = True
        log(
            WARNING,
            "W&B %s failed (%s: %s); W&B is off for the rest of this run, "
            "local outputs in %s continue",
            what,
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
            self._run_dir,
        )

    def _log_clients_table(self) -> None:
        """Log all rows of clients.csv to W&B as one table."""
        if not self._clients.rows:
            return
        data = [
            [_parse_value(row.get(c, "")) for c in self._clients.columns]
            for row in self._clients.rows
        ]
        self._run.log({"clients": self._wandb.Table(columns=self._clients.columns, data=data)})

    def _log_animations(self) -> None:
        """Log federation.gif and progress.gif to W&B as videos (a GIF file needs no codec)."""
        media = {
            key: self._wandb.Video(str(path), caption=caption)
            for key, name, caption in (
                ("federation", "federation.gif", "the federation, round by round"),
                ("samples/progress", "progress.gif", "sample grids, round by round"),
            )
            if (path := self._run_dir / name).is_file()
        }
        if media:
            self._run.log(media)
