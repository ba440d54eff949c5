"""Differential privacy's trade-off: epsilon against quality and leakage, many clients.

Run by hand from the repository root, alone on the machine (a GPU helps a lot):

    .venv/bin/python benchmarks/privacy.py [--noise 0 0.01 0.1 1] [--seeds 1 2 3]

Each job is one run of 100 clients of the embedded digits, 10 sampled each
round (fraction-train 0.1, so q = 0.1), 40 rounds of 50 local steps of 8
images (160,000 images seen, the default run's budget), 'dp' = server-fixed
with the default clipping norm and the given noise multiplier, against the
same federation without DP. The final row of each run gives epsilon at
delta 1e-5, fid, classifier-score, class-coverage, conditional accuracy, and
the leakage audit its near-copy share and membership AUC. One process per
job with one torch thread, `--processes` at a time (the real ServerApp and
ClientApps on an in-process grid). Results go to
benchmarks/results/data/privacy.json (a rerun skips the jobs done), the
report to benchmarks/results/privacy.md. `--epsilon-only` prints the
accountant's epsilon for settings without training (DP-FedAvg-GAN's too).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    Machines,
    command_line,
    machine_header,
    read_rows,
    results_file,
    run_in_process,
    run_jobs,
    spread,
    write_report,
)
from fedgan_app.config import RunConfig  # noqa: E402
from fedgan_app.outputs.runfolder import RunFolder  # noqa: E402
from fedgan_app.privacy.accounting import PrivacyBudget  # noqa: E402

NUM_CLIENTS = 100
FRACTION = 0.1
ROUNDS = 40
LOCAL_STEPS = 50
DELTA = 1e-5
NO_DP = "none"
RUNS_DIR = Path(__file__).resolve().parent / "runs" / "privacy"
# DP-FedAvg-GAN (Augenstein et al. 2020), as its code runs the EMNIST experiments
# (google-research/federated, gans/experiments/emnist/run_experiments.py): 10 users
# per round, 1,000 rounds, clip 0.1, noise multiplier 0.01; D alone trains on the
# users' data. Population: the 3,400 EMNIST writers, or the ~1,700 of a filtered half.
DP_FEDAVG_GAN = {"noise": 0.01, "per_round": 10, "rounds": 1000, "populations": (3400, 1700)}


def epsilon_of(noise: float, per_round: int, population: int, rounds: int) -> float:
    """Epsilon at DELTA after `rounds` releases, from the app's own accountant."""
    cfg = RunConfig.defaults(dp="server-fixed", dp_noise_multiplier=noise, dp_delta=DELTA)
    return PrivacyBudget(cfg, population, per_round).epsilon_after(rounds)


def run_one(noise: float | None, seed: int, out: str, rounds: int,
            local_steps: int = LOCAL_STEPS) -> dict[str, Any]:
    """One run of the many-client federation; its final row and audit."""
    name = f"{'nodp' if noise is None else f'z{noise:g}'}-{seed}"
    run_config: dict[str, Any] = {
        "fraction-train": FRACTION, "num-server-rounds": rounds, "local-steps": local_steps,
        "seed": seed, "wandb-mode": "disabled", "output-dir": out, "run-name": name,
        "fraction-evaluate": 0.0}
    if noise is not None:
        run_config.update({"dp": "server-fixed", "dp-noise-multiplier": noise,
                           "dp-delta": DELTA})
    run_dir, wall = run_in_process(run_config, NUM_CLIENTS)
    last = read_rows(run_dir / "metrics.csv")[-1]
    summary = RunFolder(run_dir).summary()
    return {"wall_s": wall, "aggregate_s": aggregate_seconds(run_dir),
            "epsilon": last.get("dp-epsilon", math.inf),
            "fid": last["fid"], "classifier-score": last["classifier-score"],
            "class-coverage": last["class-coverage"],
            "conditional-accuracy": last["conditional-accuracy"],
            "near-copies": summary.get("audit/memorization/near-copies", math.nan),
            "closer-to-train-excess": summary.get(
                "audit/memorization/closer-to-train-excess", math.nan),
            "membership-auc": summary.get("audit/membership/auc", math.nan)}


def aggregate_seconds(run_dir: Path) -> float:
    """Median seconds of the server's checks and aggregation per round (DP's own cost)."""
    times = [r["time-aggregate-s"] for r in read_rows(run_dir / "metrics.csv")
             if "time-aggregate-s" in r]
    return statistics.median(times) if times else math.nan


def report(results: dict[str, dict[str, Any]], arms: list[str], seeds: list[int]) -> str:
    """One row per arm: medians (min-max) over the seeds."""
    machines = Machines(results)
    lines = ["| DP | epsilon at delta 1e-5 | fid | classifier-score | class-coverage | "
             "conditional accuracy | near-copies | closer to train (excess) | "
             "membership AUC | minutes | server s per round | seeds | machine |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        keys = [f"{arm}|{s}" for s in seeds if f"{arm}|{s}" in results]
        if not keys:
            continue
        rows = [results[k] for k in keys]
        label = "none" if arm == NO_DP else f"server-fixed, z = {arm}"
        epsilon = rows[0]["epsilon"]
        eps_text = "–" if arm == NO_DP else ("inf" if math.isinf(epsilon) else f"{epsilon:.3g}")
        lines.append(
            f"| {label} | {eps_text} | {spread([r['fid'] for r in rows])} | "
            f"{spread([r['classifier-score'] for r in rows])} | "
            f"{spread([r['class-coverage'] for r in rows], '.3g')} | "
            f"{spread([r['conditional-accuracy'] for r in rows], '.2f')} | "
            f"{spread([r['near-copies'] for r in rows], '.3f')} | "
            f"{spread([r['closer-to-train-excess'] for r in rows], '.2f')} | "
            f"{spread([r['membership-auc'] for r in rows], '.3f')} | "
            f"{spread([r['wall_s'] / 60 for r in rows], '.3g')} | "
            f"{spread([r['aggregate_s'] for r in rows], '.2g')} | {len(rows)} | "
            f"{machines.tag(keys)} |")
    return "\n".join([*lines, "", *machines.legend()])


def reference_lines(rounds: int) -> list[str]:
    """Epsilon of DP-FedAvg-GAN's published setting, from the same accountant."""
    ref = DP_FEDAVG_GAN
    lines = ["| setting | clients per round / population | rounds | noise multiplier | "
             "epsilon at delta 1e-5 |", "|---|---|---|---|---|"]
    for population in ref["populations"]:
        eps = epsilon_of(ref["noise"], ref["per_round"], population, ref["rounds"])
        lines.append(f"| DP-FedAvg-GAN (EMNIST) | {ref['per_round']} / {population:,} | "
                     f"{ref['rounds']:,} | {ref['noise']:g} | {eps:.3g} |")
    for noise in (0.01, 0.1, 0.3, 1.0, 2.0):
        eps = epsilon_of(noise, int(NUM_CLIENTS * FRACTION), NUM_CLIENTS, rounds)
        lines.append(f"| this benchmark | {int(NUM_CLIENTS * FRACTION)} / {NUM_CLIENTS} | "
                     f"{rounds} | {noise:g} | {eps:.3g} |")
    return lines


def main() -> None:
    """Run the jobs not done yet, then write the report from every result so far."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.01, 0.1, 1.0])
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the runs without DP")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--epsilon-only", action="store_true",
                        help="print the accountant's table and stop")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--local-steps", type=int, default=LOCAL_STEPS)
    parser.add_argument("--quick", action="store_true",
                        help="2 rounds, under benchmarks/runs/ only")
    args = parser.parse_args()
    if args.epsilon_only:
        print("\n".join(reference_lines(args.rounds)))
        return
    rounds = 2 if args.quick else args.rounds
    out = RUNS_DIR / ("quick" if args.quick else "runs")
    arms: dict[str, float | None] = {} if args.no_baseline else {NO_DP: None}
    arms.update({f"{z:g}": z for z in args.noise})
    jobs = {f"{arm}|{seed}": partial(run_one, noise, seed, str(out), rounds, args.local_steps)
            for arm, noise in arms.items() for seed in args.seeds}
    header = machine_header()
    results = run_jobs(jobs, results_file("privacy", out, args.quick), args.processes)
    done = sorted({k.split("|")[0] for k in results},
                  key=lambda a: -1.0 if a == NO_DP else float(a))
    seeds = sorted({int(k.rsplit("|", 1)[1]) for k in results})
    text = (f"# Differential privacy: epsilon against quality and leakage\n\n{header}\n\n"
            f"Command: `{command_line()}`. {NUM_CLIENTS} clients of the embedded digits, "
            f"{int(NUM_CLIENTS * FRACTION)} sampled per round (q = {FRACTION:g}), {rounds} "
            f"rounds of {args.local_steps} local steps of 8 images "
            f"({rounds * args.local_steps * 8 * int(NUM_CLIENTS * FRACTION):,} images seen); "
            "every other setting default "
            "(clipping norm 20); quality of the last round (1,000 samples) and the leakage "
            "audit of the final models (docs/privacy.md: near-copies and the excess "
            "preference for training images are of the samples that look like data; "
            "'–' when too few do). Minutes: the whole run, "
            f"{args.processes} at a time on the machine; server s per round: the median "
            "`time-aggregate-s`, the server's checks and aggregation, where DP clips "
            "and adds the noise.\n\n## Results\n\n"
            + report(results, done, seeds)
            + "\n## Epsilon of other settings (the same accountant, no training)\n\n"
            + "\n".join(reference_lines(rounds)) + "\n")
    write_report("privacy", text, out, args.quick)


if __name__ == "__main__":
    main()
