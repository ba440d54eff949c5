"""What a run persists: round numbers, the rows, checkpoints, resume.

The strategy pushes what it learns in a round (counts, client metrics, one row
per reply, the server optimizer's state) and the end of the round
(fedgan_app.round_end) pushes the sample grids, quality metrics and the EMA
generator; `Recorder.commit` then persists the round in one order: the
metrics and clients rows, latest.pt (the commit point), best.pt, and the
per-round refresh of the outputs (plots, progress.gif, federation.gif,
dashboard page). Round numbers are the run's own: a resumed run's
`Strategy.start` counts from 1 again, and `Recorder.absolute` is the one place
that adds the checkpoint's round.

Resume lives here too: `load_resume` reads and checks the checkpoint named by
'resume-from', `run_folder` picks the folder to continue in, and `Recorder.open`
refuses a run folder whose metrics.csv lost rounds its checkpoint holds. One
run writes a run folder at a time: `Recorder.open` locks it (.fedgan-run.lock)
until `Recorder.finish` or the end of the process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from flwr.common.logger import log

from fedgan_app.config import RunConfig
from fedgan_app.files import LockHeld, RunLock
from fedgan_app.outputs.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_state_matches,
    load_checkpoint,
    resolve_resume_path,
    save_checkpoint,
)
from fedgan_app.outputs.runfolder import (
    CHECKPOINTS_DIR,
    LATEST_CHECKPOINT,
    RunFolder,
    csv_rounds,
)
from fedgan_app.outputs.tracking import LocalFiles, Output, WandbRun
from fedgan_app.quality.metrics import format_quality
from fedgan_app.settings import ConfigError

# W&B online without network would otherwise block for its default 90 s.
WANDB_INIT_TIMEOUT_S = 30.0
# Parts of the run's time measured before the commit: part -> metrics.csv column.
ROW_TIMES = {"query": "time-query-s", "clients": "time-clients-s",
             "aggregate": "time-aggregate-s", "sample": "time-sample-s",
             "eval": "eval-time-s"}
# Settings a resumed run may change without changing what the run computes.
RESUME_MAY_CHANGE = frozenset(
    {"num-server-rounds", "resume-from", "output-dir", "run-name", "wandb-mode",
     "wandb-project", "device", "round-timeout", "sample-every", "eval-every",
     "eval-samples", "animation-share"}
)


class RunFolderInUse(ConfigError):
    """Another run (another process) is writing the run folder."""


@dataclass
class _Pending:
    """What a round has pushed before its commit."""

    row: dict[str, float] = field(default_factory=dict)
    clients: list[dict[str, Any]] = field(default_factory=list)


class Recorder:
    """Persists every round of one run; numbers the rounds.

    Parameters
    ----------
    cfg : RunConfig
        The run's settings.
    run_dir : Path
        The run folder (see `run_folder`).
    resume : Checkpoint | None
        The checkpoint this run continues, or None for a fresh run.
    resume_path : Path | None
        Where `resume` was read from.

    """

    def __init__(self, cfg: RunConfig, run_dir: Path, resume: Checkpoint | None = None,
                 resume_path: Path | None = None) -> None:
        """Take the run's settings and folder; nothing is written before `open`."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.resume_path = resume_path
        self.offset = resume.server_round if resume else 0
        self.best_metric = resume.best_metric if resume else None
        self.best_round = resume.best_round if resume else None
        self.folder = RunFolder(self.run_dir)
        self.outputs: list[Output] = []
        self._lock = RunLock(self.folder.run_lock)
        self._wandb: WandbRun | None = None
        self._strategy_state: dict[str, Any] = dict(resume.strategy_state) if resume else {}
        self._pending: dict[int, _Pending] = {}
        self._clock = time.perf_counter()
        # Seconds spent in each part of the server's work, over the whole run
        # (summary.json "time/<part>-s"): the throughput benchmark's breakdown.
        self._created = time.perf_counter()
        self.timings: dict[str, float] = {}

    @property
    def resumed(self) -> bool:
        """Whether this run continues a checkpoint."""
        return self.resume is not None

    @property
    def checkpoint_dir(self) -> Path:
        """Where latest.pt and best.pt live."""
        return self.folder.checkpoints_dir

    @property
    def wandb_run_id(self) -> str | None:
        """The W&B run's id; a resumed run keeps its id even when W&B failed to start."""
        live = self._wandb.run_id if self._wandb is not None else None
        return live or (self.resume.wandb_run_id if self.resume else None)

    def check(self) -> None:
        """Refuse (ConfigError) a resumed folder whose CSVs lost rounds; reads only.

        The run calls it before anything is sent to a node; `open` checks again
        under the folder's lock.
        """
        if self.resume is not None and self.resume_path is not None:
            _check_history(self.run_dir, self.resume_path, self.resume.server_round)

    def open(self) -> None:
        """Lock the run folder, check a resumed one, start the local files and W&B.

        Raises RunFolderInUse when another run writes the folder, and ConfigError
        when a resumed folder's metrics.csv lost rounds of its checkpoint; in
        both cases nothing in the folder was written.
        """
        _lock_run_folder(self._lock, self.run_dir, self.resumed)
        try:
            self.check()
            config = self.cfg.to_dict()
            self.outputs = [LocalFiles(self.run_dir, config,
                                       resume_after_round=self.offset if self.resumed
                                       else None,
                                       animation_share=self.cfg.animation_share)]
            if self.cfg.wandb_mode != "disabled":
                self._wandb = WandbRun(
                    self.run_dir, config, mode=self.cfg.wandb_mode,
                    project=self.cfg.wandb_project, run_name=self.run_dir.name,
                    run_id=self.resume.wandb_run_id if self.resume else None,
                    init_timeout_s=WANDB_INIT_TIMEOUT_S)
                self.outputs.append(self._wandb)
            self._repair_best()
        except BaseException:
            self._lock.release()  # finish() is not called for a run that never opened
            raise
        log(INFO, "fedgan: writing outputs to %s", self.run_dir)

    def absolute(self, local_round: int) -> int:
        """The run's round number of a round of this `Strategy.start` (0: before any)."""
        return local_round + self.offset

    def start_clock(self) -> None:
        """Start timing the first round."""
        self._clock = time.perf_counter()

    def record_train(self, server_round: int, row: dict[str, float],
                     clients: list[dict[str, Any]], strategy_state: dict[str, Any]) -> None:
        """Take a round's counts and metrics, its per-reply rows, the optimizer state."""
        pending = self._pending.setdefault(server_round, _Pending())
        pending.row.update(row)
        pending.clients = list(clients)
        self._strategy_state = strategy_state

    def record_evaluate(self, server_round: int, row: dict[str, float]) -> None:
        """Take a round's aggregated client-evaluation metrics."""
        self._pending.setdefault(server_round, _Pending()).row.update(row)

    def record_samples(self, server_round: int, grid: Any) -> None:
        """Write a round's sample grid (uint8, (H, W, 3)) to every output."""
        for output in self.outputs:
            output.log_samples(server_round, grid)

    def record_class_samples(self, server_round: int, grid: Any) -> None:
        """Write a round's per-class grid (one row per class) to every output."""
        for output in self.outputs:
            output.log_class_samples(server_round, grid)

    def refresh(self) -> None:
        """Rebuild every output's views now (e.g. the dashboard page before round 1)."""
        for output in self.outputs:
            output.refresh()

    def record_summary(self, values: Mapping[str, float]) -> None:
        """Merge values measured once (the leakage audit's) into the summary.

        The page shows them from `finish`'s last refresh on.
        """
        for output in self.outputs:
            output.log_summary(values)

    def record_reference(self, reference: Mapping[str, float]) -> None:
        """Put the real-vs-real reference row into the run summary."""
        self.record_summary({f"reference/{k}": v for k, v in reference.items()})

    def commit(self, server_round: int, arrays: ArrayRecord, quality: Mapping[str, float],
               ema_state: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Persist a round: row, latest.pt, best.pt, refresh; returns the round's row.

        `quality` holds the row's columns measured at the end of the round;
        `ema_state` is the EMA generator's packed state after it (None: the run
        keeps none), saved in the checkpoints.
        """
        pending = self._pending.pop(server_round, _Pending())
        started = time.perf_counter()
        row = {**pending.row, **quality, "round-time-s": started - self._clock,
               "unix-time": time.time()}  # when the round ended: start-up is measurable
        for part, column in ROW_TIMES.items():
            self._add_time(part, row.get(column, 0.0))
        improved = self._update_best(server_round, row)
        # The rows first, latest.pt next: latest.pt is the commit point. A crash
        # before it leaves rows of this round that a resume drops and redoes; the
        # reverse order could leave a checkpointed round without its row.
        for output in self.outputs:
            output.log_round(server_round, row)
            if pending.clients:
                output.log_clients(server_round, pending.clients)
        written = time.perf_counter()
        checkpoint = self._checkpoint(server_round, arrays, ema_state)
        save_checkpoint(checkpoint, self.folder.latest_pt)
        if improved:
            save_checkpoint(checkpoint, self.folder.best_pt)
        saved = time.perf_counter()
        _log_round_line(server_round, self.cfg.num_server_rounds, row)
        if server_round == self.cfg.num_server_rounds:
            self._final_summary(row)
        for output in self.outputs:
            output.refresh()
        self._clock = time.perf_counter()
        self._add_time("outputs", written - started)
        self._add_time("checkpoint", saved - written)
        self._add_time("refresh", self._clock - saved)
        return row

    def finish(self) -> None:
        """Finish every output (also after a failed round), unlock; re-raise the first error."""
        try:
            self._add_time("run", time.perf_counter() - self._created)
            for output in self.outputs:
                output.log_summary({f"time/{k}-s": v for k, v in self.timings.items()})
            errors = []
            for output in self.outputs:
                try:
                    output.finish()
                except Exception as exc:  # noqa: BLE001 - the others must still finish
                    errors.append(exc)
        finally:
            self._lock.release()
        if errors:
            raise errors[0]

    def _add_time(self, part: str, seconds: float) -> None:
        """Add seconds to a part of the run's time."""
        self.timings[part] = self.timings.get(part, 0.0) + float(seconds)

    def _checkpoint(self, server_round: int, arrays: ArrayRecord,
                    ema_state: Mapping[str, torch.Tensor] | None) -> Checkpoint:
        """Everything needed to resume after this round."""
        return Checkpoint(
            state=arrays.to_torch_state_dict(), server_round=server_round,
            config=self.cfg.to_dict(), best_metric=self.best_metric,
            best_round=self.best_round, wandb_run_id=self.wandb_run_id,
            strategy_state=dict(self._strategy_state),
            ema_state=None if ema_state is None else dict(ema_state),
        )

    def _update_best(self, server_round: int, row: Mapping[str, float]) -> bool:
        """Track the lowest fid; True when this round is the new best."""
        fid = row.get("fid")
        if fid is None or not math.isfinite(fid):
            return False
        if self.best_metric is None or fid < self.best_metric:
            self.best_metric, self.best_round = fid, server_round
            return True
        return False

    def _repair_best(self) -> None:
        """Rewrite best.pt when a crash came between latest.pt and best.pt."""
        resume, path = self.resume, self.resume_path
        if resume is None or path is None or path.parent != self.checkpoint_dir:
            return
        if resume.best_round != resume.server_round:
            return
        best = self.folder.best_pt
        try:
            best_round = load_checkpoint(best).server_round
        except CheckpointError:
            best_round = None
        if best_round != resume.best_round:
            log(WARNING, "best.pt lagged behind %s (round %s); rewriting it", path.name,
                resume.best_round)
            save_checkpoint(resume, best)

    def _final_summary(self, row: Mapping[str, float]) -> None:
        """Record and log the best round and the final metrics."""
        summary: dict[str, Any] = {"final/" + k: v for k, v in row.items()}
        summary.update({"best/round": self.best_round, "best/fid": self.best_metric})
        for output in self.outputs:
            output.log_summary(summary)
        if self.best_round is not None:
            log(INFO, "best round %d: fid %.3f (checkpoint %s)", self.best_round,
                self.best_metric, self.folder.best_pt)
        log(INFO, "final samples: %s", self.folder.samples_dir)


def _log_round_line(server_round: int, num_rounds: int, row: Mapping[str, float]) -> None:
    """One readable line per round in the run log."""
    clients = (f"clients {int(row.get('replies-accepted', 0))} ok, "
               f"{int(row.get('replies-dropped', 0))} dropped, "
               f"{int(row.get('replies-failed', 0))} failed")
    if row.get("replies-missing"):
        clients += f", {int(row['replies-missing'])} late"
    text = (f"round {server_round}/{num_rounds}: loss D {row.get('loss-d', math.nan):.3f} "
            f"G {row.get('loss-g', math.nan):.3f} | D(x) {row.get('d-x', math.nan):.2f} "
            f"D(G(z)) {row.get('d-gz', math.nan):.2f} | {clients} | "
            f"{row['round-time-s']:.1f}s")
    if "dp-epsilon" in row:
        text += f" | epsilon {row['dp-epsilon']:.4g}"
    if "fid" in row:
        text += " | " + format_quality(row)
    log(INFO, text)


# --- resume ---------------------------------------------------------------------


def load_resume(cfg: RunConfig) -> tuple[Path | None, Checkpoint | None]:
    """The checkpoint 'resume-from' names, checked against the settings (or None)."""
    if not cfg.resume_from:
        return None, None
    path = resolve_resume_path(cfg.resume_from)
    checkpoint = load_checkpoint(path)
    newest = _newest_round_beside(path)
    if newest is not None and newest > checkpoint.server_round:
        # e.g. best.pt of round 5 in a run folder at round 10: resuming there would
        # drop rounds 6..10 from its CSVs, samples and latest.pt.
        raise ConfigError(
            f"setting 'resume-from': {path} holds round {checkpoint.server_round} but its "
            f"run folder is already at round {newest} ({path.parent / LATEST_CHECKPOINT}); "
            "resuming there would overwrite the later rounds. Resume from the run folder, or copy "
            "the checkpoint out of it to continue in a new run folder"
        )
    if checkpoint.server_round >= cfg.num_server_rounds:
        raise ConfigError(
            f"setting 'num-server-rounds' is {cfg.num_server_rounds} but the checkpoint "
            f"already finished round {checkpoint.server_round}; raise it to train further"
        )
    current = cfg.to_dict()
    changed = sorted(k for k, v in current.items() if k not in RESUME_MAY_CHANGE
                     and k in checkpoint.config and checkpoint.config[k] != v)
    if changed:
        log(WARNING, "resuming with settings that differ from the checkpoint's run: %s",
            ", ".join(f"{k} {checkpoint.config[k]!r} -> {current[k]!r}" for k in changed))
    log(INFO, "resuming from %s (after round %d)", path, checkpoint.server_round)
    return path, checkpoint


def resume_arrays(checkpoint: Checkpoint, path: Path, reference: ArrayRecord) -> ArrayRecord:
    """The checkpoint's global model, after checking it fits the models built now."""
    check_state_matches(checkpoint, path, {k: tuple(v.shape) for k, v in reference.items()})
    return ArrayRecord(checkpoint.state)


def _newest_round_beside(path: Path) -> int | None:
    """Round of the latest.pt beside a checkpoint in a run folder, if another one."""
    latest = path.parent / LATEST_CHECKPOINT
    if path.parent.name != CHECKPOINTS_DIR or latest == path or not latest.is_file():
        return None
    try:
        return load_checkpoint(latest).server_round
    except CheckpointError:
        return None  # a broken latest.pt: resuming from another file is the way out

def run_folder(cfg: RunConfig, resume_path: Path | None) -> Path:
    """The run's output folder, created and checked to be writable and free.

    A resumed run appends to the folder its checkpoint lies in
    (`<run>/checkpoints/x.pt`); a checkpoint kept anywhere else starts a new
    folder from 'output-dir' and 'run-name'. A folder another run is writing
    is refused here already (RunFolderInUse), before the data is loaded;
    `Recorder.open` takes the lock for the run.
    """
    if resume_path is not None and resume_path.parent.name == CHECKPOINTS_DIR:
        run_dir = resume_path.parent.parent
    else:
        base = Path(cfg.output_dir).expanduser().resolve()
        run_dir = base / (cfg.run_name or datetime.now().strftime("%Y%m%d-%H%M%S"))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"setting 'output-dir': cannot write to {run_dir} ({exc.strerror})"
        ) from exc
    probe_lock = RunLock(RunFolder(run_dir).run_lock)
    _lock_run_folder(probe_lock, run_dir, resume_path is not None)
    probe_lock.release()
    return run_dir


def _lock_run_folder(lock: RunLock, run_dir: Path, resumed: bool) -> None:
    """Take the run folder's lock, or raise RunFolderInUse naming its holder."""
    try:
        lock.acquire()
    except LockHeld as exc:
        way_out = ("resume once it has stopped" if resumed
                   else "choose another 'run-name' or 'output-dir'")
        raise RunFolderInUse(
            f"run folder {run_dir} is in use: another fedgan run is writing to it "
            f"({exc.holder}; lock file {exc.path.name}). Wait for it to finish or stop "
            f"it, or {way_out}; nothing in the folder was changed"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"setting 'output-dir': cannot lock {run_dir} ({exc.strerror})"
        ) from exc


def _check_history(run_dir: Path, resume_path: Path, server_round: int) -> None:
    """Refuse to resume a run folder whose CSVs lost rows its checkpoint holds.

    Every round's row is written before its latest.pt, so a checkpoint of
    round R in this folder means metrics.csv has rows up to R. An empty or
    header-only file, or one that ends early, is damage (a power loss during
    a write, a hand edit): resuming would rewrite it without those rounds.
    """
    folder = RunFolder(run_dir)
    if resume_path.parent != folder.checkpoints_dir or server_round < 1:
        return  # a checkpoint from elsewhere starts this folder's history anew
    metrics, clients = folder.metrics_csv, folder.clients_csv
    for path in (clients, metrics):  # clients.csv: only readable (a round may have no row)
        try:
            rounds = csv_rounds(path)
        except ValueError as exc:
            raise _damage(path, resume_path, server_round, str(exc)) from None
    if rounds is None:
        problem = "is missing"
    elif not rounds:
        problem = "holds only its header"
    else:
        kept = sorted({r for r in rounds if r <= server_round})
        missing = sorted(set(range(kept[0] if kept else 1, server_round + 1)) - set(kept))
        if not missing:
            return
        problem = (f"ends at round {kept[-1]}" if kept and kept[-1] < server_round
                   else f"lacks the rows of rounds {', '.join(map(str, missing[:5]))}"
                   + (", ..." if len(missing) > 5 else ""))
    raise _damage(metrics, resume_path, server_round, problem)


def _damage(path: Path, resume_path: Path, server_round: int, problem: str) -> ConfigError:
    """The error for a run folder whose history lost rounds of its checkpoint."""
    return ConfigError(
        f"setting 'resume-from': {path} {problem}, but {resume_path} holds round "
        f"{server_round}: the run folder is damaged (a power loss or a crash during a "
        "write?), and resuming would rewrite the file without those rounds. Nothing was "
        "changed. Restore the file from a backup, or copy the checkpoint out of the run "
        "folder and resume from the copy with another 'run-name' (a new run folder)"
    )
