"""Run tracking through two small outputs: local files and W&B.

`LocalFiles` writes every file under ``outputs/<run>/`` except checkpoints
(the names: fedgan_app.outputs.runfolder)::

    run_config.json          the full config of the run
    metrics.csv              one row per server round ("round" first)
    clients.csv              one row per reply per round ("round" first)
    samples/round_NNNN.png   sample grid of the fixed noise batch
    samples/classes_round_NNNN.png  one row per class (conditional runs)
    summary.json             final summary values

The views of those files (plots/, progress.gif, federation.gif,
dashboard.html) are rebuilt after every round by
``fedgan_app.outputs.views.refresh_run``, which `LocalFiles.refresh` calls (the
two animations on a time budget, 'animation-share', and after the last round).
`WandbRun` mirrors the same calls to a W&B run (``wandb/``, offline unless
chosen otherwise), and at the end logs the animations and the clients table.
Both implement `Output`; the recorder (fedgan_app.outputs.recorder) is their only
caller.

Every file is written atomically (`fedgan_app.files`: temp file, fsync,
rename), so a crash or a power loss never leaves a half or empty file behind.
W&B is best effort: its first failure is logged once as a warning, W&B is
switched off for the rest of the run, and local outputs keep coming.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.common.logger import log

from fedgan_app.files import atomic_write, write_json, write_text
from fedgan_app.outputs import views
from fedgan_app.outputs.runfolder import RunFolder, read_table, round_of, sample_paths

WANDB_MODES = ("offline", "online", "disabled")


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

    def load(self, keep_up_to_round: int | None) -> int:
        """Load ``path``, keeping rounds <= ``keep_up_to_round`` (None: all); # dropped."""
        if not self.path.exists():
            return 0
        columns, read = read_table(self.path)
        kept = [
            row for row in read if round_of(row) is not None
            and (keep_up_to_round is None or round_of(row) <= keep_up_to_round)
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
        write_text(self.path, buf.getvalue())

    def column(self, name: str) -> tuple[list[int], list[float]]:
        """Return (rounds, values) of the numeric cells of column ``name``."""
        rounds, values = [], []
        for row in self.rows:
            value = _parse_value(row.get(name, ""))
            if isinstance(value, int | float):
                rounds.append(int(row["round"]))
                values.append(float(value))
        return rounds, values


class Output(Protocol):
    """Where the recorder writes a run: local files, W&B."""

    def log_round(self, server_round: int, row: Mapping[str, float]) -> None:
        """Record the metrics row of a round."""

    def log_clients(self, server_round: int, rows: list[dict[str, Any]]) -> None:
        """Record one row per reply of a round."""

    def log_samples(self, server_round: int, grid: np.ndarray) -> None:
        """Record the sample grid of a round (uint8, (H, W, 3))."""

    def log_class_samples(self, server_round: int, grid: np.ndarray) -> None:
        """Record a conditional run's per-class grid of a round (one row per class)."""

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Merge values into the run summary."""

    def refresh(self) -> None:
        """Rebuild what is derived from the rounds so far (GIF, plots)."""

    def finish(self) -> None:
        """Write what is left and close; later calls do nothing."""


class LocalFiles:
    """Writes the files of one run under ``run_dir`` (all but the checkpoints).

    Parameters
    ----------
    run_dir : Path
        Folder of the run (``outputs/<run>``); created if missing.
    config : dict[str, Any]
        Full run configuration, written to ``run_config.json``.
    resume_after_round : int | None
        When resuming from a checkpoint of round R: keep the rows and grids of
        rounds <= R already on disk and drop later ones (written by the crashed
        run after its last checkpoint), so the resumed run appends without
        duplicates.
    animation_share : float
        Most of the run's time the per-round redraws of progress.gif and
        federation.gif may take (`fedgan_app.outputs.views.AnimationBudget`; 1:
        every round). The finish always redraws them.

    """

    def __init__(self, run_dir: Path, config: dict[str, Any],
                 resume_after_round: int | None = None,
                 animation_share: float = 1.0) -> None:
        """Create the folders, write run_config.json, reload a resumed run."""
        self._animations = views.AnimationBudget(animation_share)
        self.run_dir = Path(run_dir)
        self._folder = RunFolder(self.run_dir)
        for folder in (self.run_dir, self._folder.samples_dir, self._folder.plots_dir):
            folder.mkdir(parents=True, exist_ok=True)
        write_json(self._folder.run_config_json, config, indent=2, sort_keys=True,
                   default=_json_default)
        self._metrics = _CsvTable(self._folder.metrics_csv)
        self._clients = _CsvTable(self._folder.clients_csv)
        self._summary: dict[str, Any] = {}
        self._finished = False
        if resume_after_round is not None:
            self._load_previous(resume_after_round)

    def log_round(self, server_round: int, row: Mapping[str, float]) -> None:
        """Append a row to metrics.csv (new keys become new columns)."""
        self._metrics.add(server_round, [row])
        self._metrics.write()

    def log_clients(self, server_round: int, rows: list[dict[str, Any]]) -> None:
        """Append one row per reply to clients.csv."""
        self._clients.add(server_round, rows)
        self._clients.write()

    def log_samples(self, server_round: int, grid: np.ndarray) -> None:
        """Write samples/round_NNNN.png from a uint8 (H, W, 3) grid."""
        _check_grid(grid)
        from PIL import Image

        path = self._folder.sample(server_round)
        atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))

    def log_class_samples(self, server_round: int, grid: np.ndarray) -> None:
        """Write samples/classes_round_NNNN.png (one row per class) from a uint8 grid."""
        _check_grid(grid)
        from PIL import Image

        path = self._folder.sample(server_round, per_class=True)
        atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Merge ``summary`` into summary.json."""
        self._summary.update(summary)
        write_json(self._folder.summary_json, self._summary, indent=2, sort_keys=True,
                   default=_json_default)

    def refresh(self, final: bool = False) -> None:
        """Rebuild the views: plots and page; the animations when due (always if final)."""
        animations = final or self._animations.due()
        seconds = views.refresh_run(self.run_dir, animations=animations)
        if animations:
            self._animations.spent(seconds)

    def finish(self) -> None:
        """Refresh once more, animations too (a crashed round's grid included); idempotent."""
        if self._finished:
            return
        self._finished = True
        self.refresh(final=True)
        log(INFO, "Run outputs written to %s", self.run_dir)

    def _load_previous(self, resume_after_round: int) -> None:
        """Reload rows of rounds <= ``resume_after_round``; drop later rows and grids."""
        dropped_metrics = self._metrics.load(resume_after_round)
        dropped_clients = self._clients.load(resume_after_round)
        # Rewrite now, so the files match the resumed history before the next round.
        self._metrics.write()
        self._clients.write()
        kept, dropped_samples = 0, 0
        for per_class in (False, True):
            for server_round, path in sample_paths(self.run_dir, per_class).items():
                if server_round <= resume_after_round:
                    kept += not per_class
                else:
                    path.unlink()  # the crashed run's grid; the resumed run writes its own
                    dropped_samples += 1
        log(INFO, "Resuming after round %d: kept %d metric rows, %d client rows, "
            "%d sample grids; dropped %d, %d, %d of later rounds", resume_after_round,
            len(self._metrics.rows), len(self._clients.rows), kept, dropped_metrics,
            dropped_clients, dropped_samples)


class WandbRun:
    """Mirrors a run to Weights & Biases; never stops training.

    Parameters
    ----------
    run_dir : Path
        Folder of the run; W&B adds its own ``wandb/`` below it.
    config : dict[str, Any]
        Full run configuration, logged as the W&B config.
    mode : str
        ``"offline"`` or ``"online"`` (``"disabled"``: do not build one).
    project : str
        W&B project name.
    run_name : str | None
        W&B display name; W&B picks one when None.
    run_id : str | None
        Id of an earlier W&B run to continue (from a checkpoint); new run when None.
    init_timeout_s : float | None
        Seconds ``wandb.init`` may wait for the server (online mode); W&B's
        default (90 s) when None.

    """

    def __init__(self, run_dir: Path, config: dict[str, Any], mode: str = "offline",
                 project: str = "fedgan", run_name: str | None = None,
                 run_id: str | None = None, init_timeout_s: float | None = None) -> None:
        """Import wandb and start (or resume) the run; on failure warn, go on without."""
        if mode not in ("offline", "online"):
            raise ValueError(f"mode must be 'offline' or 'online', got {mode!r}")
        self.run_dir = Path(run_dir)
        self._wandb: Any = None
        self._run: Any = None
        self.run_id: str | None = None  # None when W&B failed to start
        self._warned = False
        try:
            import wandb  # only here: a disabled run never imports W&B

            settings = (wandb.Settings(init_timeout=init_timeout_s)
                        if init_timeout_s is not None else None)
            run = wandb.init(
                project=project, name=run_name, config=config,
                dir=str(self.run_dir),  # W&B adds its own wandb/ below this
                mode=mode, id=run_id, resume="allow" if run_id is not None else None,
                # Each output owns its run; never log into another one's run.
                reinit="create_new", settings=settings,
            )
            # Plot against the server round, not W&B's own step counter, so repeated
            # or out-of-order rounds (resume) are never dropped as "old steps".
            run.define_metric("round")
            for prefix in ("global", "client", "samples"):
                run.define_metric(f"{prefix}/*", step_metric="round")
        except Exception as exc:  # noqa: BLE001 - W&B must never stop training
            self._warn("init", exc)
            return
        self._wandb, self._run, self.run_id = wandb, run, run.id

    def log_round(self, server_round: int, row: Mapping[str, float]) -> None:
        """Log the row as ``global/<key>`` against the round."""
        self._log(server_round, {f"global/{k}": v for k, v in row.items()})

    def log_clients(self, server_round: int, rows: list[dict[str, Any]]) -> None:
        """Log each reply's numbers as ``client/<partition>/<key>``."""
        scalars: dict[str, Any] = {}
        for index, row in enumerate(rows):
            # Name series by partition id, stable across rounds; reply index otherwise.
            client = row.get("partition-id", f"reply-{index}")
            scalars.update(
                {f"client/{client}/{k}": v for k, v in row.items() if k != "partition-id"}
            )
        self._log(server_round, scalars)

    def log_samples(self, server_round: int, grid: np.ndarray) -> None:
        """Log the grid as ``samples/grid``."""
        _check_grid(grid)
        if self._run is not None:
            self._call("log of the sample grid", lambda: self._run.log({
                "round": server_round,
                "samples/grid": self._wandb.Image(grid, caption=f"round {server_round}"),
            }))

    def log_class_samples(self, server_round: int, grid: np.ndarray) -> None:
        """Log the per-class grid as ``samples/classes``."""
        _check_grid(grid)
        if self._run is not None:
            self._call("log of the per-class grid", lambda: self._run.log({
                "round": server_round,
                "samples/classes": self._wandb.Image(
                    grid, caption=f"one row per class, round {server_round}"),
            }))

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Merge values into the W&B run summary."""
        if self._run is not None:
            self._call("summary update", lambda: self._run.summary.update(dict(summary)))

    def refresh(self) -> None:
        """Nothing to rebuild: W&B draws its own charts."""

    def finish(self) -> None:
        """Log the clients table and the animations, and finish the run; idempotent."""
        if self._run is None:
            return
        self._call("log of the clients table", self._log_clients_table)
        self._call("log of the animations", self._log_animations)
        run, self._run = self._run, None  # later calls do nothing
        self._call("finish", run.finish)

    def _log(self, server_round: int, values: Mapping[str, Any]) -> None:
        """Log the numeric entries of ``values`` against ``server_round``."""
        if self._run is None:
            return
        scalars = {k: s for k, v in values.items() if (s := _wandb_scalar(v)) is not None}
        self._call("log", lambda: self._run.log({"round": server_round, **scalars}))

    def _call(self, what: str, call: Callable[[], Any]) -> None:
        """Run a W&B call; on any exception warn once and switch W&B off for good."""
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - local files are the record
            self._warn(what, exc)
            self._run = None

    def _warn(self, what: str, exc: Exception) -> None:
        """Log the first W&B failure as a warning; later ones would only repeat it."""
        if self._warned:
            return
        self._warned = True
        log(WARNING, "W&B %s failed (%s: %s); W&B is off for the rest of this run, "
            "local outputs in %s continue", what, type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "", self.run_dir)

    def _log_clients_table(self) -> None:
        """Log the run folder's clients.csv (resumed rounds too) as one W&B table."""
        clients = _CsvTable(RunFolder(self.run_dir).clients_csv)
        clients.load(keep_up_to_round=None)
        if not clients.rows:
            return
        data = [[_parse_value(row.get(c, "")) for c in clients.columns]
                for row in clients.rows]
        self._run.log({"clients": self._wandb.Table(columns=clients.columns, data=data)})

    def _log_animations(self) -> None:
        """Log federation.gif and progress.gif as W&B videos (a GIF file needs no codec)."""
        folder = RunFolder(self.run_dir)
        media = {
            key: self._wandb.Video(str(path), caption=caption)
            for key, path, caption in (
                ("federation", folder.federation_gif, "the federation, round by round"),
                ("samples/progress", folder.progress_gif, "sample grids, round by round"),
            )
            if path.is_file()
        }
        if media:
            self._run.log(media)


def _check_grid(grid: np.ndarray) -> None:
    """Raise ValueError unless ``grid`` is a uint8 (H, W, 3) image."""
    if grid.dtype != np.uint8 or grid.ndim != 3 or grid.shape[2] != 3:
        raise ValueError(f"grid must be uint8 (H, W, 3), got {grid.dtype} {grid.shape}")
