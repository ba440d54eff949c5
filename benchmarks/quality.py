"""Does federating pay? Centralized, local-only and FedGAN at an equal number of images.

Run by hand from the repository root, alone on the machine:

    .venv/bin/python benchmarks/quality.py                       # every row, 3 seeds, 160k
    .venv/bin/python benchmarks/quality.py --seeds 0 --images 80000 --curve-images 160000
    .venv/bin/python benchmarks/quality.py --quick               # smoke run (tiny budget)

Every row is the app itself (the real ServerApp and ClientApps in process,
harness.inprocess) with its default recipe, so no row can drift from what
`flwr run` trains; only the federation differs:

* centralized: one node that holds the pooled training data (the 4,000
  images the 5 clients split), for `--images` images. One node keeps its
  Adam state across rounds and FedAvg of one reply is that reply, so this is
  plain centralized training. Scored every `--curve-every` images: the
  curve of fid against images seen, run on to `--curve-images` for the first
  seed, shows where training flattens.
* local-only: each of the 5 clients of the pathological split (2 classes
  each) alone on its own partition, for the steps it trains in the
  federation (a fifth of the images); best client and mean of the 5.
* FedGAN iid, dirichlet 0.3 and pathological 2 classes per client: 5 clients.

Each of these unconditional (`conditional = false`) and conditional (the
default: projection discriminator). Every row is scored by the app's own
quality judge on the server's held-out split; the reference row (real
held-out vs real training images) comes from the same judge.

Results accumulate in benchmarks/results/data/quality-<images/1000>k-<recipe>.json
(committed, so a rerun in a fresh clone continues where the last one
stopped); the report goes to benchmarks/results/quality.md and the final
grids of the first seed to benchmarks/results/quality.png (`--quick`: under
benchmarks/runs/ only).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    RUNS_DIR,
    Machines,
    command_line,
    quiet_environment,
    read_rows,
    results_file,
    run_in_process,
    run_jobs,
    spread,
)
from fedgan_app.outputs.runfolder import RunFolder  # noqa: E402
from fedgan_app.settings import SETTINGS_BY_KEY  # noqa: E402

NUM_CLIENTS = 5
# The app's own defaults, read from its settings table, so that the rows train
# what `flwr run` trains: one round of one client = LOCAL_STEPS x BATCH images.
LOCAL_STEPS = SETTINGS_BY_KEY["local-steps"].default
BATCH = SETTINGS_BY_KEY["batch-size"].default
LR = (SETTINGS_BY_KEY["lr-generator"].default, SETTINGS_BY_KEY["lr-discriminator"].default)
DIFFAUGMENT = SETTINGS_BY_KEY["diffaugment"].default
IMAGES_PER_STEP_ROUND = LOCAL_STEPS * BATCH
METRICS = ("fid", "classifier-score", "class-coverage", "density", "coverage",
           "conditional-accuracy")
MODES: dict[str, dict[str, Any]] = {"unconditional": {"conditional": False},
                                    "conditional": {"conditional": True}}
SPLITS: dict[str, dict[str, Any]] = {
    "iid": {"partitioner": "iid"},
    "dirichlet 0.3": {"partitioner": "dirichlet", "dirichlet-alpha": 0.3},
    "pathological 2/client": {"partitioner": "pathological", "classes-per-client": 2},
}
LOCAL_SPLIT = "pathological 2/client"
# The goals and the best public FedAvg-GAN table (PathMNIST, 5 clients).
GOALS = {"iid": 1.2, "dirichlet 0.3": 1.3}
PUBLIC = {"iid": 1.32, "dirichlet 0.3": 1.42}
DRAWS_CLASS = 0.9  # a class counts as drawn on request at this conditional accuracy
SMOOTHING = 3  # evaluations averaged in the smoothed FedGAN / centralized ratio


def defaults_digest() -> str:
    """Six hex digits of every default setting: the rows' recipe in a file name.

    The readable part of the name (steps, batch, lr) misses the rest of the
    recipe; a change of any default (DiffAugment, say) changes this digest,
    so its rows go to a new results file instead of joining the old ones.
    """
    defaults = {s.key: s.default for s in SETTINGS_BY_KEY.values()}
    return hashlib.sha256(json.dumps(defaults, sort_keys=True).encode()).hexdigest()[:6]


def run_job(kind: str, mode: str, seed: int, images: int, eval_every_images: int,
            eval_samples: int, out_dir: str, split: str = "iid",
            partition: int | None = None) -> dict[str, Any]:
    """One run of the app: its quality curve, final grid and wall time.

    `kind` is "centralized" (one node, the pooled data), "local" (one node,
    partition `partition` of the 5-client `split`) or "fedgan" (5 nodes).
    """
    nodes = NUM_CLIENTS if kind == "fedgan" else 1
    rounds = max(1, images // (nodes * IMAGES_PER_STEP_ROUND))
    eval_every = max(1, eval_every_images // (nodes * IMAGES_PER_STEP_ROUND))
    name = "-".join(str(p) for p in (kind, mode, split.split()[0], partition, f"s{seed}")
                    if p is not None)
    config = {
        **MODES[mode], **SPLITS["iid" if kind == "centralized" else split],
        "seed": seed, "num-server-rounds": rounds, "local-steps": LOCAL_STEPS,
        "batch-size": BATCH, "eval-every": eval_every, "eval-samples": eval_samples,
        "sample-every": rounds, "fraction-evaluate": 0.0, "client-threads": 1,
        "wandb-mode": "disabled", "output-dir": out_dir, "run-name": name,
    }
    shutil.rmtree(Path(out_dir) / name, ignore_errors=True)  # never a mix of runs
    grid_options = ({"partition_ids": [partition], "num_partitions": NUM_CLIENTS}
                    if kind == "local" else {})
    run_dir, wall = run_in_process(config, nodes, **grid_options)
    rows = read_rows(RunFolder(run_dir).metrics_csv)
    per_round = nodes * IMAGES_PER_STEP_ROUND
    curve = [{"images": int(r["round"]) * per_round,
              **{k: v for k, v in r.items() if k.startswith(METRICS)}}
             for r in rows if "fid" in r]
    summary = read_summary(run_dir)
    grids = {}
    for label, per_class in (("grid", False), ("classes", True)):
        source = RunFolder(run_dir).sample(rounds, per_class)
        if source.is_file():
            target = Path(out_dir) / "grids" / f"{name}-{label}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            grids[label] = str(target)
    shutil.rmtree(RunFolder(run_dir).checkpoints_dir, ignore_errors=True)  # megabytes a run
    return {"curve": curve, "wall_s": wall, "images": rounds * per_round,
            "train_s": sum(r.get("time-clients-s", 0.0) for r in rows), "grids": grids,
            "reference": {k.split("/", 1)[1]: v for k, v in summary.items()
                          if k.startswith("reference/")}}


def read_summary(run_dir: Path) -> dict[str, Any]:
    """The run's summary.json ({} when missing)."""
    path = RunFolder(run_dir).summary_json
    return json.loads(path.read_text()) if path.is_file() else {}


def jobs_for(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Every (row, mode, seed) job, keyed by a stable name."""
    common = {"eval_every_images": args.curve_every, "eval_samples": args.eval_samples,
              "out_dir": str(out)}
    jobs: dict[str, Any] = {}
    for seed in args.seeds:
        for mode in MODES:
            # The first seed's centralized run goes on to the curve's end.
            images = args.curve_images if seed == args.seeds[0] else args.images
            jobs[f"centralized|{mode}|{seed}"] = partial(
                run_job, "centralized", mode, seed, images, **common)
            for split in SPLITS:
                jobs[f"fedgan {split}|{mode}|{seed}"] = partial(
                    run_job, "fedgan", mode, seed, args.images, split=split, **common)
            for j in range(NUM_CLIENTS):
                jobs[f"local {j}|{mode}|{seed}"] = partial(
                    run_job, "local", mode, seed, args.images // NUM_CLIENTS,
                    split=LOCAL_SPLIT, partition=j, **{**common, "eval_every_images":
                                                       args.images // NUM_CLIENTS})
    return jobs


# --- the report ----------------------------------------------------------------


def at_images(result: dict[str, Any], images: int) -> dict[str, float]:
    """The metrics of a run's curve point at `images` images (the last one before it)."""
    points = [p for p in result["curve"] if p["images"] <= images]
    return points[-1] if points else {}


def row_runs(results: dict[str, Any], row: str, mode: str, seeds: list[int],
             images: int) -> list[dict[str, float]]:
    """Per seed, the metrics of one row (local-only: 'local best' / 'local mean')."""
    runs = []
    for seed in seeds:
        if row.startswith("local"):
            clients = [at_images(results[k], images // NUM_CLIENTS) for j in range(NUM_CLIENTS)
                       if (k := f"local {j}|{mode}|{seed}") in results]
            if len(clients) < NUM_CLIENTS:
                continue
            if row == "local-only best client":
                runs.append(min(clients, key=lambda c: c.get("fid", float("inf"))))
            else:
                runs.append({m: statistics.fmean(c[m] for c in clients)
                             for m in METRICS if all(m in c for c in clients)})
        elif (key := f"{row}|{mode}|{seed}") in results:
            runs.append(at_images(results[key], images))
    return runs


ROWS = ("centralized", "local-only best client", "local-only mean of 5",
        *(f"fedgan {s}" for s in SPLITS))


def rows_table(results: dict[str, Any], seeds: list[int], images: int) -> list[str]:
    """The main table: every row and mode, median (min–max) over seeds."""
    head = ["row", "mode", "seeds", *METRICS, "train s (local-only: per client)", "machine"]
    machines = Machines(results)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    # The reference of the default run's own setting (5 iid clients): each run draws
    # its real training images from its own partitioning and seed, so the row differs
    # between runs.
    ordered = sorted(results.items(), key=lambda item: not item[0].startswith("fedgan iid|"))
    reference = next((r["reference"] for _, r in ordered if r.get("reference")), {})
    if reference:
        lines.append("| reference (real held-out vs real train; 5 iid clients, first seed) | | | "
                     + " | ".join(spread([reference.get(m, float("nan"))]) for m in METRICS)
                     + " | | |")
    for row in ROWS:
        for mode in MODES:
            runs = row_runs(results, row, mode, seeds, images)
            if not runs:
                continue
            keys = ([f"local {j}|{mode}|{s}" for s in seeds for j in range(NUM_CLIENTS)]
                    if row.startswith("local") else [f"{row}|{mode}|{s}" for s in seeds])
            train = [results[k]["train_s"] for k in keys if k in results]
            cells = [spread([r.get(m, float("nan")) for r in runs]) for m in METRICS]
            lines.append(f"| {row} | {mode} | {len(runs)} | " + " | ".join(cells)
                         + f" | {spread(train, '.0f') if train else ''} | {machines.tag(keys)} |")
    return lines


def last_fids(result: dict[str, Any], images: int, count: int = SMOOTHING) -> list[float]:
    """The fid of the last `count` evaluations at or before `images` images."""
    return [p["fid"] for p in result["curve"] if p["images"] <= images and "fid" in p][-count:]


def ratio_lines(results: dict[str, Any], seeds: list[int], images: int) -> list[str]:
    """FedGAN fid / centralized fid per split and mode, against the goals.

    Per seed, at the budget, and (a GAN's fid swings from one evaluation to the
    next) as the ratio of the two runs' mean fid over their last SMOOTHING
    evaluations, which both arms reach at the same images.
    """
    lines = ["| split | mode | FedGAN fid / centralized fid | the same, mean of the last "
             f"{SMOOTHING} evaluations | goal | best public table |",
             "|---|---|---|---|---|---|"]
    for split in SPLITS:
        for mode in MODES:
            ratios, smoothed = [], []
            for seed in seeds:
                fed = row_runs(results, f"fedgan {split}", mode, [seed], images)
                central = row_runs(results, "centralized", mode, [seed], images)
                if fed and central and central[0].get("fid"):
                    ratios.append(fed[0]["fid"] / central[0]["fid"])
                    smoothed.append(
                        statistics.fmean(last_fids(results[f"fedgan {split}|{mode}|{seed}"],
                                                   images))
                        / statistics.fmean(last_fids(results[f"centralized|{mode}|{seed}"],
                                                     images)))
            if ratios:
                goal = f"<= {GOALS[split]}x" if split in GOALS else ""
                public = f"{PUBLIC[split]}x" if split in PUBLIC else ""
                lines.append(f"| {split} | {mode} | {spread(ratios, '.2f')} | "
                             f"{spread(smoothed, '.2f')} | {goal} | {public} |")
    return lines


def curve_lines(results: dict[str, Any], seed: int) -> list[str]:
    """The centralized curve of the first seed, and where it flattens."""
    runs = {mode: results.get(f"centralized|{mode}|{seed}") for mode in MODES}
    points = sorted({p["images"] for r in runs.values() if r for p in r["curve"]})
    lines = ["| images | " + " | ".join(f"fid {m} | classifier-score {m}" for m in MODES)
             + " |", "|---|" + "---|---|" * len(MODES)]
    for images in points:
        cells = []
        for run in runs.values():
            point = next((p for p in run["curve"] if p["images"] == images), {}) if run else {}
            cells += [format(point.get("fid", float("nan")), ".3g"),
                      format(point.get("classifier-score", float("nan")), ".3g")]
        lines.append(f"| {images:,} | " + " | ".join(cells) + " |")
    lines.append("")
    machines = Machines(results)
    for mode, run in runs.items():
        if run:
            machine = machines.tag([f"centralized|{mode}|{seed}"])
            lines.append(f"- {mode} (machine {machine}): {flattening(run['curve'])}")
    return lines


def flattening(curve: list[dict[str, float]]) -> str:
    """Where fid stops paying: from the first point on which no doubling gains 10%.

    One seed's curve is noisy, so a single flat doubling is not enough: every
    later point whose doubled budget is on the curve must gain less than 10%.
    """
    by_images = {p["images"]: p["fid"] for p in curve if "fid" in p}
    points = sorted(by_images)
    for start in points:
        pairs = [(i, by_images[i], by_images[2 * i]) for i in points
                 if i >= start and 2 * i in by_images]
        if pairs and all(doubled > 0.9 * fid for _, fid, doubled in pairs):
            return (f"from {start:,} images on, no doubling gains 10% (fid "
                    f"{by_images[start]:.3g} at {start:,}, {by_images[points[-1]]:.3g} at "
                    f"{points[-1]:,})")
    last = points[-1] if points else 0
    return (f"not flattened within {last:,} images: some doubling from each point on "
            f"still gains 10% or more (fid {by_images[points[0]]:.3g} at {points[0]:,}, "
            f"{by_images[last]:.3g} at {last:,})" if points else "no curve")


def pathological_lines(results: dict[str, Any], seeds: list[int], images: int) -> list[str]:
    """Per class: conditional accuracy of FedGAN pathological vs each local-only client."""
    seed = seeds[0]
    fed = row_runs(results, f"fedgan {LOCAL_SPLIT}", "conditional", [seed], images)
    clients = [at_images(results[k], images // NUM_CLIENTS) for j in range(NUM_CLIENTS)
               if (k := f"local {j}|conditional|{seed}") in results]
    if not fed:
        return ["(not run yet)"]
    classes = sorted(int(k.split("/")[1]) for k in fed[0] if k.startswith(
        "conditional-accuracy/"))
    head = ["model", *(str(c) for c in classes), f"classes >= {DRAWS_CLASS}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, metrics in [("FedGAN pathological", fed[0]),
                           *((f"local-only client {j}", c) for j, c in enumerate(clients))]:
        accuracy = [metrics.get(f"conditional-accuracy/{c}", float("nan")) for c in classes]
        drawn = sum(a >= DRAWS_CLASS for a in accuracy)
        lines.append(f"| {label} | " + " | ".join(f"{a:.2f}" for a in accuracy)
                     + f" | {drawn} |")
    return lines


def write_image(path: Path, results: dict[str, Any], seed: int) -> None:
    """One tile per row and mode: the final grids of one seed, titled."""
    import matplotlib

    matplotlib.use("Agg")
    import imageio.v3 as iio
    import matplotlib.pyplot as plt

    tiles = []
    for row in ("centralized", *(f"fedgan {s}" for s in SPLITS), "local 0", "local 1"):
        for mode in MODES:
            result = results.get(f"{row}|{mode}|{seed}")
            if result and result["grids"].get("grid"):
                tiles.append((f"{row}, {mode}", result["grids"]["grid"]))
    missing = [grid for _, grid in tiles if not Path(grid).is_file()]
    if missing:
        # The grids live in the (uncommitted) run folder: a fresh clone has the
        # results file but not them. Keep the image already written rather than
        # replace it with one that lacks tiles.
        print(f"kept {path}: {len(missing)} final grids are gone, e.g. {missing[0]}")
        return
    if not tiles:
        return
    cols = 4
    fig, axes = plt.subplots((len(tiles) + cols - 1) // cols, cols,
                             figsize=(3 * cols, 3.2 * ((len(tiles) + cols - 1) // cols)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, grid) in zip(axes.flat, tiles, strict=False):
        ax.imshow(iio.imread(grid), cmap="gray")
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    """The markdown report, every figure computed from the results."""
    seeds = sorted({int(k.rsplit("|", 1)[1]) for k in results})
    return "\n".join([
        "# Sample quality: centralized, local-only and FedGAN at equal images", "",
        f"Command: `{command_line()}`", "",
        *(["This call ran only the jobs its `--only` names; the tables hold every "
           "row of the results file, earlier calls' too.", ""] if args.only else []),
        *Machines(results).legend(),
        f"Budget of the rows: {args.images:,} images seen in all (FedGAN: "
        f"{NUM_CLIENTS} clients x {args.images // (NUM_CLIENTS * IMAGES_PER_STEP_ROUND)} "
        f"rounds x {LOCAL_STEPS} steps x batch {BATCH}; local-only: each client its fifth, "
        f"{args.images // NUM_CLIENTS:,}); quality from {args.eval_samples} samples; "
        f"seeds {seeds}; the app's default recipe otherwise (Adam lr {LR[0]:g} for G, "
        f"{LR[1]:g} for D, DiffAugment {DIFFAUGMENT!r}).", "",
        "## The centralized curve (first seed)", "", *curve_lines(results, seeds[0]), "",
        "## Rows at the budget: median (min–max) over seeds", "",
        *rows_table(results, seeds, args.images), "",
        "## Does federating pay? FedGAN against centralized at the same images", "",
        *ratio_lines(results, seeds, args.images), "",
        f"## Pathological split, conditional: classes drawn on request (seed {seeds[0]})",
        "", f"Conditional accuracy per class (the share of images asked for class c that "
        f"the evaluator calls c); a class counts as drawn at >= {DRAWS_CLASS}.", "",
        *pathological_lines(results, seeds, args.images), "",
        "![final grids](quality.png)", ""])


def main() -> None:
    """Parse options, run the missing jobs, write the report and the image."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=160_000,
                        help="images seen in all by each row (a multiple of 8,000)")
    parser.add_argument("--curve-images", type=int, default=160_000,
                        help="the first seed's centralized run goes on to this many")
    parser.add_argument("--curve-every", type=int, default=16_000)
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--only", nargs="+", help="rows to run (prefix match of job names)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny budget")
    args = parser.parse_args()
    if args.quick:
        args.images = args.curve_images = args.curve_every = 8_000
        args.eval_samples, args.seeds = 100, args.seeds[:1]
    step = NUM_CLIENTS * IMAGES_PER_STEP_ROUND
    if args.images % step or args.curve_every % IMAGES_PER_STEP_ROUND:
        parser.error(f"--images must be a multiple of {step:,} and --curve-every of "
                     f"{IMAGES_PER_STEP_ROUND:,}")
    quiet_environment()
    # One results folder per budget and recipe: a changed default starts afresh
    # instead of mixing its rows with the old recipe's.
    recipe = f"steps{LOCAL_STEPS}-batch{BATCH}-lr{LR[0]:g}-{LR[1]:g}-{defaults_digest()}"
    out = RUNS_DIR / ("quality-quick" if args.quick
                      else f"quality-{args.images // 1000}k-{recipe}")
    jobs = jobs_for(args, out)
    if args.only:
        jobs = {k: v for k, v in jobs.items() if any(k.startswith(o) for o in args.only)}
    results = run_jobs(jobs, results_file(out.name, out, args.quick), args.processes)
    target_dir = out if args.quick else RESULTS_DIR
    target_dir.mkdir(parents=True, exist_ok=True)
    (target_dir / "quality.md").write_text(report(results, args))
    write_image(target_dir / "quality.png", results, min(args.seeds))
    print(f"wrote {target_dir / 'quality.md'}")


if __name__ == "__main__":
    main()
