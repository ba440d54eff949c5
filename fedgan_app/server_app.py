"""ServerApp: wire config, models, FedGAN strategy, tracker and evaluation; run."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedgan_app.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_state_matches,
    load_checkpoint,
    resolve_resume_path,
    save_checkpoint,
)
from fedgan_app.config import ConfigError, RunConfig
from fedgan_app.dashboard import refresh_run
from fedgan_app.data import (
    ImageData,
    PartitionSpec,
    load_server_split,
    load_train_pool,
    partition_spec,
)
from fedgan_app.evaluation import Evaluator, compute_quality
from fedgan_app.evaluator_cache import load_or_train_evaluator
from fedgan_app.models import GANConfig, Generator, build_gan, pack_gan, pick_device, split_state
from fedgan_app.strategy import FedGAN
from fedgan_app.tracking import RunTracker, make_grid
from fedgan_app.training import derive_seed, sample_images

app = ServerApp()

GRID_IMAGES = 64
# W&B online without network would otherwise block for its default 90 s.
WANDB_INIT_TIMEOUT_S = 30.0
QUALITY_KEYS = ("fid", "classifier-score", "class-coverage", "precision", "recall")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedGAN for the configured rounds and write every output."""
    # Settings, checked before anything else happens.
    cfg = RunConfig.from_run_config(context.run_config)
    resume_path = resolve_resume_path(cfg.resume_from) if cfg.resume_from else None
    resume = _load_resume(cfg, resume_path) if resume_path else None
    start_round = resume.server_round if resume else 0
    if start_round >= cfg.num_server_rounds:
        raise ConfigError(
            f"setting 'num-server-rounds' is {cfg.num_server_rounds} but the checkpoint "
            f"already finished round {start_round}; raise it to train further"
        )

    # Data the server owns: its held-out split (never a client's partition).
    spec = partition_spec(cfg, num_partitions=max(1, len(list(grid.get_node_ids()))))
    server_data = load_server_split(spec)
    gan_cfg = GANConfig.for_images(server_data.image_shape, cfg.latent_dim)
    generator, discriminator = build_gan(gan_cfg, cfg.seed)
    initial = pack_gan(generator, discriminator)
    reference = initial
    if resume:
        check_state_matches(resume, resume_path,
                            {k: tuple(v.shape) for k, v in reference.items()})
        initial = ArrayRecord(resume.state)

    # Outputs: one folder per run; resume appends to the checkpoint's folder.
    run_dir = _run_dir(cfg, resume_path)
    tracker = RunTracker(
        run_dir, cfg.to_dict(), wandb_mode=cfg.wandb_mode,
        wandb_project=cfg.wandb_project, run_name=run_dir.name,
        wandb_run_id=resume.wandb_run_id if resume else None,
        resume_after_round=start_round if resume else None,
        wandb_init_timeout_s=WANDB_INIT_TIMEOUT_S,
    )
    log(INFO, "fedgan: writing outputs to %s", run_dir)
    try:
        strategy = FedGAN(cfg, reference=reference, sink=tracker, round_offset=start_round)
        evaluate_fn = make_evaluate_fn(cfg, gan_cfg, strategy, tracker, server_data,
                                       spec, run_dir, resume)
        strategy.start(
            grid=grid, initial_arrays=initial,
            num_rounds=cfg.num_server_rounds - start_round,
            timeout=cfg.round_timeout, evaluate_fn=evaluate_fn,
        )
    finally:
        # Plots, GIF and the W&B run are written even when a round raised.
        tracker.finish()


def make_evaluate_fn(
    cfg: RunConfig,
    gan_cfg: GANConfig,
    strategy: FedGAN,
    tracker: RunTracker,
    server_data: ImageData,
    spec: PartitionSpec,
    run_dir: Path,
    resume: Checkpoint | None,
) -> Callable[[int, ArrayRecord], MetricRecord | None]:
    """Build the server-side evaluate_fn: samples, quality, CSV/W&B row, checkpoints."""
    device = pick_device(cfg.device)
    noise = torch.randn(GRID_IMAGES, cfg.latent_dim,
                        generator=torch.Generator().manual_seed(derive_seed(cfg.seed, 0)))
    quality = _QualityJudge(cfg, server_data, spec, tracker)
    state = _BestState(
        best_metric=resume.best_metric if resume else None,
        best_round=resume.best_round if resume else None,
        last_time=time.perf_counter(),
    )
    offset = resume.server_round if resume else 0
    ckpt_dir = run_dir / "checkpoints"

    def evaluate_fn(local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Evaluate the global model after a round (round 0: the initial model)."""
        server_round = local_round + offset
        if local_round == 0:
            # Before round 1 only the starting grid; a resumed run has it already.
            if resume is None:
                _log_grid(tracker, arrays, gan_cfg, noise, device, 0)
            refresh_run(run_dir)  # the dashboard page exists before round 1
            state.last_time = time.perf_counter()
            return None
        last = server_round == cfg.num_server_rounds
        row: dict[str, float] = dict(strategy.round_metrics.get(server_round, {}))
        row["round-time-s"] = time.perf_counter() - state.last_time
        if server_round % cfg.sample_every == 0 or last:
            _log_grid(tracker, arrays, gan_cfg, noise, device, server_round)
        if server_round % cfg.eval_every == 0 or last:
            t0 = time.perf_counter()
            row.update(quality.evaluate(arrays, gan_cfg, device))
            row["eval-time-s"] = time.perf_counter() - t0
        improved = _maybe_best(state, row, server_round)
        # The round's rows first, latest.pt last: latest.pt is the commit point. A
        # crash before it leaves rows of this round that a resume drops and redoes;
        # the reverse order could leave a checkpointed round without its row.
        tracker.log_round(server_round, row)
        ckpt = Checkpoint(
            state=arrays.to_torch_state_dict(), server_round=server_round,
            config=cfg.to_dict(), best_metric=state.best_metric,
            best_round=state.best_round,
            # Keep the id even when W&B failed to start in this (resumed) process.
            wandb_run_id=tracker.wandb_run_id or (resume.wandb_run_id if resume else None),
        )
        if improved:
            save_checkpoint(ckpt, ckpt_dir / "best.pt")
        save_checkpoint(ckpt, ckpt_dir / "latest.pt")
        # Plots, GIFs and the dashboard page, every round (the recorder will own this call).
        refresh_run(run_dir)
        _log_summary_line(server_round, cfg.num_server_rounds, row)
        if last:
            _log_final_summary(tracker, state, row, run_dir)
        state.last_time = time.perf_counter()
        return MetricRecord({k: float(v) for k, v in row.items()})

    return evaluate_fn


@dataclass
class _BestState:
    """Best fid so far and the clock of the last round."""

    best_metric: float | None
    best_round: int | None
    last_time: float


class _QualityJudge:
    """Compute quality metrics of G with the cached evaluator classifier."""

    def __init__(self, cfg: RunConfig, server_data: ImageData, spec: PartitionSpec,
                 tracker: RunTracker) -> None:
        self.cfg = cfg
        self.server_data = server_data
        self.spec = spec
        self.cache_dir = evaluator_cache_dir()
        self.tracker = tracker
        self._evaluator: Evaluator | None = None

    def evaluator(self) -> Evaluator:
        """Load (or train once and cache) the evaluator; log the reference row."""
        if self._evaluator is None:
            key = (f"{self.cfg.dataset}|server-split|seed={self.cfg.seed}|"
                   f"n={len(self.server_data)}")
            data = self.server_data
            self._evaluator, accuracy, trained = load_or_train_evaluator(
                self.cache_dir, key, data.images, data.labels, data.num_classes,
                self.cfg.seed,
            )
            log(INFO, "evaluator classifier %s: held-out accuracy %.3f",
                "trained" if trained else "loaded from cache", accuracy)
            reference = self._reference_row(accuracy)
            self.tracker.log_summary({f"reference/{k}": v for k, v in reference.items()})
            log(INFO, "reference (real held-out vs real train): %s",
                _format_quality(reference))
        return self._evaluator

    def _reference_row(self, accuracy: float) -> dict[str, float]:
        """Metrics of real held-out images vs real training images: the ceiling."""
        pool = load_train_pool(self.spec)
        n = min(self.cfg.eval_samples, len(pool), len(self.server_data))
        quality = compute_quality(self._evaluator, self.server_data.images[:n],
                                  _subset(pool.images, n, self.cfg.seed))
        return {"evaluator-accuracy": accuracy, **quality}

    def evaluate(self, arrays: ArrayRecord, gan_cfg: GANConfig,
                 device: torch.device) -> dict[str, float]:
        """Generate eval-samples images and score them against the server split."""
        evaluator = self.evaluator()
        generator = _generator_from(arrays, gan_cfg, device)
        rng = torch.Generator().manual_seed(derive_seed(self.cfg.seed, 1))
        fakes = []
        for start in range(0, self.cfg.eval_samples, 500):
            n = min(500, self.cfg.eval_samples - start)
            z = torch.randn(n, gan_cfg.latent_dim, generator=rng)
            fakes.append(sample_images(generator, z, device))
        real = self.server_data.images[: self.cfg.eval_samples]
        return compute_quality(evaluator, real, torch.cat(fakes))


def evaluator_cache_dir() -> Path:
    """Where evaluator classifiers are cached: $FEDGAN_CACHE_DIR or ~/.cache/fedgan."""
    root = os.environ.get("FEDGAN_CACHE_DIR") or Path.home() / ".cache" / "fedgan"
    return Path(root).expanduser() / "evaluator"


def _subset(images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """A seeded random subset of n images."""
    order = torch.randperm(images.size(0), generator=torch.Generator().manual_seed(seed))
    return images[order[:n]]


def _generator_from(arrays: ArrayRecord, gan_cfg: GANConfig,
                    device: torch.device) -> Generator:
    """Build G from the packed global arrays."""
    generator = Generator(gan_cfg)
    g_state, _ = split_state(arrays.to_torch_state_dict())
    generator.load_state_dict(g_state)
    return generator.to(device)


def _log_grid(tracker: RunTracker, arrays: ArrayRecord, gan_cfg: GANConfig,
              noise: torch.Tensor, device: torch.device, server_round: int) -> None:
    """Sample the fixed noise and save the grid for this round."""
    images = sample_images(_generator_from(arrays, gan_cfg, device), noise, device)
    tracker.log_samples(server_round, make_grid(images, nrow=8))


def _maybe_best(state: _BestState, row: dict[str, float], server_round: int) -> bool:
    """Update the best fid; True when this round is the new best."""
    fid = row.get("fid")
    if fid is None or not math.isfinite(fid):
        return False
    if state.best_metric is None or fid < state.best_metric:
        state.best_metric, state.best_round = fid, server_round
        return True
    return False


def _log_summary_line(server_round: int, num_rounds: int, row: dict[str, float]) -> None:
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
    if "fid" in row:
        text += " | " + _format_quality(row)
    log(INFO, text)


def _format_quality(row: dict[str, float]) -> str:
    """Quality metrics as 'fid 12.3 classifier-score 8.1 ...'."""
    return " ".join(f"{k} {row[k]:.3g}" for k in QUALITY_KEYS if k in row)


def _log_final_summary(tracker: RunTracker, state: _BestState,
                       row: dict[str, float], run_dir: Path) -> None:
    """Log and record the best round and the final metrics."""
    summary = {"final/" + k: v for k, v in row.items()}
    summary.update({"best/round": state.best_round, "best/fid": state.best_metric})
    tracker.log_summary(summary)
    if state.best_round is not None:
        log(INFO, "best round %d: fid %.3f (checkpoint %s)", state.best_round,
            state.best_metric, run_dir / "checkpoints" / "best.pt")
    log(INFO, "final samples: %s", run_dir / "samples")


# Settings a resumed run may change without changing what the run computes.
RESUME_MAY_CHANGE = frozenset(
    {"num-server-rounds", "resume-from", "output-dir", "run-name", "wandb-mode",
     "wandb-project", "device", "round-timeout", "sample-every", "eval-every",
     "eval-samples"}
)


def _load_resume(cfg: RunConfig, path: Path) -> Checkpoint:
    """Load the checkpoint named by 'resume-from' (resolved to `path`) and check it."""
    ckpt = load_checkpoint(path)
    newest = _newest_round_beside(path)
    if newest is not None and newest > ckpt.server_round:
        # e.g. best.pt of round 5 in a run folder at round 10: resuming there would
        # drop rounds 6..10 from its CSVs, samples and latest.pt.
        raise ConfigError(
            f"setting 'resume-from': {path} holds round {ckpt.server_round} but its run "
            f"folder is already at round {newest} ({path.parent / 'latest.pt'}); "
            "resuming there would overwrite the later rounds. Resume from the run "
            "folder, or copy the checkpoint out of it to continue in a new run folder"
        )
    changed = sorted(
        k for k, v in cfg.to_dict().items()
        if k not in RESUME_MAY_CHANGE and k in ckpt.config and ckpt.config[k] != v
    )
    if changed:
        log(WARNING, "resuming with settings that differ from the checkpoint's run: %s",
            ", ".join(f"{k} {ckpt.config[k]!r} -> {cfg.to_dict()[k]!r}" for k in changed))
    log(INFO, "resuming from %s (after round %d)", path, ckpt.server_round)
    return ckpt


def _newest_round_beside(path: Path) -> int | None:
    """Round of the latest.pt beside a checkpoint in a run folder, if another one."""
    latest = path.parent / "latest.pt"
    if path.parent.name != "checkpoints" or latest == path or not latest.is_file():
        return None
    try:
        return load_checkpoint(latest).server_round
    except CheckpointError:
        return None  # a broken latest.pt: resuming from another file is the way out


def _run_dir(cfg: RunConfig, ckpt_path: Path | None) -> Path:
    """The run's output folder; checks that it is writable.

    A resumed run appends to the folder its checkpoint lies in
    (`<run>/checkpoints/x.pt`); a checkpoint kept anywhere else starts a new
    folder from 'output-dir' and 'run-name'.
    """
    if ckpt_path is not None and ckpt_path.parent.name == "checkpoints":
        run_dir = ckpt_path.parent.parent
    else:
        base = Path(cfg.output_dir).expanduser().resolve()
        name = cfg.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = base / name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"setting 'output-dir': cannot write to {run_dir} ({exc.strerror})"
        ) from exc
    return run_dir

