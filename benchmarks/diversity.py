"""Diversity levers on the default run: precision, recall, density and coverage beside fid.

Run by hand from the repository root, alone on the machine:

    .venv/bin/python benchmarks/diversity.py [--arm minibatch-std-4 ...] [--seeds 1 2 3]

Each arm is the default run (5 iid clients, 20 rounds of 200 local steps of
8 images: 160,000 images seen) with one change (two where an arm combines
levers; the "320k" and "480k" arms run 40 and 60 rounds); "default" changes nothing.
One process and one torch thread per run, `--processes` at a time (the real
ServerApp and ClientApps on an in-process grid); the jobs go seed by seed, so
the first seed of every arm is done first. The final row of each run gives
fid, precision, recall, density, coverage and the classes drawn on request
at conditional accuracy 0.9 or more; the real-data reference (held-out
against training images, the same judge) comes from the runs' summary.json.
Evaluation noise is never truncated (`fedgan_app.quality.judge` draws plain
N(0, 1) for every scored image). Results go to
benchmarks/results/data/diversity.json (a rerun skips the jobs done) and the
report to benchmarks/results/diversity.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    Machines,
    command_line,
    final_quality,
    machine_header,
    results_file,
    run_in_process,
    run_jobs,
    spread,
    write_report,
)

NUM_CLIENTS = 5
DEFAULT_ROUNDS = 20
CLASSES = 10
RUNS_DIR = Path(__file__).resolve().parent / "runs" / "diversity"
# One change each against the default run (docs/settings.md says what each does).
ARMS: dict[str, dict[str, Any]] = {
    "default": {},
    "minibatch-std-4": {"d-minibatch-std": 4},
    "mode-seeking-1": {"mode-seeking": 1.0},
    "mode-seeking-0.3": {"mode-seeking": 0.3},
    "d-lr-x2": {"lr-discriminator": 4e-3},
    "ema-0.5": {"generator-ema": 0.5},
    # Two levers together (each alone moved a different metric), more G, more images.
    "mode-seeking-0.5-minibatch-std-4": {"mode-seeking": 0.5, "d-minibatch-std": 4},
    "mode-seeking-0.3-minibatch-std-4": {"mode-seeking": 0.3, "d-minibatch-std": 4},
    "g-width-64": {"g-width": 64},
    "320k-images": {"num-server-rounds": 40},
    # Budget for coverage, mode-seeking for recall.
    "320k-mode-seeking-0.5": {"num-server-rounds": 40, "mode-seeking": 0.5},
    "320k-mode-seeking-0.3": {"num-server-rounds": 40, "mode-seeking": 0.3},
    "320k-mode-seeking-1": {"num-server-rounds": 40, "mode-seeking": 1.0},
    # New levers at 160k: a late, lower learning rate; the hinge loss; DiffAugment.
    "lr-decay-5": {"lr-decay-every": 5, "lr-decay-factor": 0.5},
    "hinge": {"gan-loss": "hinge"},
    "diffaugment-translation": {"diffaugment": "translation"},
    "beta1-0": {"adam-beta1": 0.0},
    # A wider G to pay mode-seeking's fidelity cost; G's or D's capacity and pace.
    "g-width-64-mode-seeking-0.5": {"g-width": 64, "mode-seeking": 0.5},
    "g-width-64-mode-seeking-1": {"g-width": 64, "mode-seeking": 1.0},
    "g-lr-x2": {"lr-generator": 4e-3},
    "d-width-128": {"d-width": 128},
    # Twice the updates for the same images: half the batch, twice the local steps.
    "batch-4": {"batch-size": 4, "local-steps": 400},
    "g-lr-x2-mode-seeking-0.5": {"lr-generator": 4e-3, "mode-seeking": 0.5},
    # Three times the images: does the budget alone bring coverage to real data's?
    "480k-images": {"num-server-rounds": 60},
    "480k-mode-seeking-0.5": {"num-server-rounds": 60, "mode-seeking": 0.5},
    # the label sets G's every BatchNorm too (conditional BatchNorm), not only its input
    "g-conditional-bn": {"g-conditioning": "batchnorm"},
    "g-conditional-bn-mode-seeking-0.5": {"g-conditioning": "batchnorm", "mode-seeking": 0.5},
    # a deeper G: 3x3 layers at 14x14 between the upsampling and the output layer
    "g-depth-1": {"g-depth": 1},
    "g-depth-2": {"g-depth": 2},
    "g-depth-1-mode-seeking-0.5": {"g-depth": 1, "mode-seeking": 0.5},
    "g-depth-1-mode-seeking-1": {"g-depth": 1, "mode-seeking": 1.0},
    "g-depth-1-mode-seeking-0.75": {"g-depth": 1, "mode-seeking": 0.75},
    # the server's EMA of G, to steady the mode-seeking runs' last round
    "g-depth-1-mode-seeking-0.5-ema-0.5": {"g-depth": 1, "mode-seeking": 0.5,
                                           "generator-ema": 0.5},
    # depth and budget, the two changes that raised coverage, together
    "320k-g-depth-1": {"num-server-rounds": 40, "g-depth": 1},
    "320k-g-depth-1-mode-seeking-0.5": {"num-server-rounds": 40, "g-depth": 1,
                                        "mode-seeking": 0.5},
}
METRICS = ("fid", "precision", "recall", "density", "coverage")
# the arms that change a step
STEP_ARMS = ("default", "minibatch-std-4", "mode-seeking-0.3", "g-depth-1",
             "g-depth-1-mode-seeking-0.5")
STEP_COUNT, STEP_REPEATS = 50, 7
GOALS = {"recall": 0.9, "coverage": 0.92}


def run_one(arm: str, seed: int, out: str, rounds: int) -> dict[str, Any]:
    """One default run with the arm's change; its final quality row and the reference."""
    name = f"{arm}-{seed}"
    # An arm's own round count scales with --quick like the default's 20.
    arm_rounds = ARMS[arm].get("num-server-rounds", DEFAULT_ROUNDS) * rounds // DEFAULT_ROUNDS
    run_config = {**ARMS[arm], "num-server-rounds": arm_rounds, "seed": seed,
                  "wandb-mode": "disabled", "audit-samples": 0, "output-dir": out,
                  "run-name": name}
    run_dir, wall = run_in_process(run_config, NUM_CLIENTS)
    quality = final_quality(run_dir, CLASSES)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return {"wall_s": wall, **{m: quality[m] for m in METRICS},
            "classes-at-0.9": quality["classes-at-0.9"],
            "reference": {k.split("/", 1)[1]: v for k, v in summary.items()
                          if k.startswith("reference/")}}


def step_cost(out: str) -> dict[str, Any]:
    """Milliseconds of one local step per arm: median of STEP_REPEATS x STEP_COUNT steps.

    The arms take turns in one process (one torch thread, channels_last, the
    default run's 8-image batches), so a slower or busier moment hits each.
    """
    import statistics

    import torch

    from fedgan_app.config import RunConfig
    from fedgan_app.gan.models import build_gan, gan_config
    from fedgan_app.gan.training import (
        Agent,
        LocalRound,
        StepRecipe,
        make_optimizers,
        to_channels_last,
        train_gan,
    )

    del out  # nothing written: the figures are the result
    torch.set_num_threads(1)
    images = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.arange(64) % 10

    def batches():  # noqa: ANN202 - an endless stream of the default batch
        step = 0
        while True:
            index = torch.arange(step * 8, step * 8 + 8) % 64
            yield images[index], labels[index]
            step += 1

    times: dict[str, list[float]] = {arm: [] for arm in STEP_ARMS}
    for _ in range(STEP_REPEATS):
        for arm in STEP_ARMS:
            cfg = RunConfig.from_run_config(ARMS[arm])
            generator, discriminator = build_gan(gan_config(cfg, (1, 28, 28), 10), 0)
            opt_g, opt_d = make_optimizers(generator, discriminator, cfg.lr_generator,
                                           cfg.lr_discriminator, (cfg.adam_beta1, cfg.adam_beta2))
            to_channels_last(generator, discriminator)
            local = LocalRound(STEP_COUNT, torch.device("cpu"), torch.Generator().manual_seed(0),
                               StepRecipe.from_settings(cfg), channels_last=True)
            stats = train_gan(Agent(generator, discriminator, opt_g, opt_d), batches(), local)
            times[arm].append(stats.wall_time_s / STEP_COUNT * 1000)
    return {f"{arm}-ms": statistics.median(times[arm]) for arm in STEP_ARMS}


def report(results: dict[str, dict[str, Any]], arms: list[str], seeds: list[int]) -> str:
    """One row per arm: medians (min-max) over the seeds, wall time against the default."""
    machines = Machines(results)
    lines = ["| arm | change | fid | precision | recall | density | coverage | "
             "classes >= 0.9 (per seed) | min per run | seeds | machine |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        keys = [f"{arm}|{s}" for s in seeds if f"{arm}|{s}" in results]
        if not keys:
            continue
        rows = [results[k] for k in keys]
        change = ", ".join(f"`{k} = {v!r}`" if isinstance(v, str) else f"`{k} = {v:g}`"
                           for k, v in ARMS[arm].items()) or "none"
        cells = [spread([r[m] for r in rows], ".3g" if m == "fid" else ".3f") for m in METRICS]
        classes = ", ".join(str(int(r["classes-at-0.9"])) for r in rows)
        minutes = spread([r["wall_s"] / 60 for r in rows])
        lines.append(f"| {arm} | {change} | {' | '.join(cells)} | {classes} | {minutes} | "
                     f"{len(rows)} | {machines.tag(keys)} |")
    references = [r["reference"] for r in results.values() if r.get("reference")]
    if references:
        ref = references[0]
        lines.append("| real data | held-out against training images | "
                     + " | ".join(f"{ref[m]:.3g}" if m == "fid" else f"{ref[m]:.3f}"
                                  for m in METRICS) + " | – | – | – | – |")
    goals = ", ".join(f"{m} >= {v}" for m, v in GOALS.items())
    lines += ["", f"Goals for the default run: {goals}."]
    if "step-cost" in results:
        cost = results["step-cost"]
        base = cost["default-ms"]
        lines += ["", "## The cost of a local step", "",
                  f"Median of {STEP_REPEATS} x {STEP_COUNT} steps, the arms taking turns in "
                  "one process (one torch thread, 8-image batches, channels_last), machine "
                  f"{machines.tag(['step-cost'])}:", "",
                  "| arm | ms a step | against the default |", "|---|---|---|"]
        lines += [f"| {arm} | {cost[f'{arm}-ms']:.1f} | {cost[f'{arm}-ms'] / base:.2f}x |"
                  for arm in STEP_ARMS if f"{arm}-ms" in cost]
    return "\n".join([*lines, "", *machines.legend()])


def main() -> None:
    """Run the jobs not done yet, then write the report from every result so far."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arm", action="append", choices=tuple(ARMS), default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--job", action="append", default=None, metavar="ARM:SEED",
                        help="run these jobs, in this order, instead of every arm x seed")
    parser.add_argument("--step-cost", action="store_true",
                        help="also time a local step of the arms that change it")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="2 rounds, under benchmarks/runs/ only")
    args = parser.parse_args()
    arms = args.arm or list(ARMS)
    rounds = 2 if args.quick else DEFAULT_ROUNDS
    out = RUNS_DIR / ("quick" if args.quick else "runs")
    pairs = ([(arm, int(seed)) for arm, seed in (j.rsplit(":", 1) for j in args.job)]
             if args.job else [(arm, seed) for seed in args.seeds for arm in arms])
    unknown = sorted({arm for arm, _ in pairs} - set(ARMS))
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; known: {', '.join(ARMS)}")
    jobs = {f"{arm}|{seed}": partial(run_one, arm, seed, str(out), rounds)
            for arm, seed in pairs}
    if args.step_cost:
        jobs["step-cost"] = partial(step_cost, str(out))
    header = machine_header()
    results = run_jobs(jobs, results_file("diversity", out, args.quick), args.processes)
    done = [a for a in ARMS if any(k.startswith(a + "|") for k in results)]
    seeds = sorted({int(k.rsplit("|", 1)[1]) for k in results if "|" in k})
    text = (f"# Diversity levers on the default run\n\n{header}\n\n"
            f"Last command: `{command_line()}` (the rows accumulate over runs of the script "
            f"in data/diversity.json). The default run (5 iid clients, {rounds} rounds of "
            f"200 local steps of 8 images: {rounds * 8_000:,} images seen) with one change "
            "each, or the changes an arm names (the 320k and 480k arms run twice and three "
            f"times the rounds: {2 * rounds * 8_000:,} and {3 * rounds * 8_000:,} images); "
            "one process and one torch thread per run; "
            "quality of the last round "
            "(1,000 samples, plain N(0, 1) noise: no truncation).\n\n## Results\n\n"
            + report(results, done, seeds) + "\n")
    write_report("diversity", text, out, args.quick)


if __name__ == "__main__":
    main()
