"""Class-aware aggregation against plain FedGAN on a skewed split, at the default budget.

Run by hand from the repository root, alone on the machine:

    .venv/bin/python benchmarks/class_aware.py [--split pathological] [--seeds 1 2 3]

Each job is the default run (5 clients, 20 rounds of 200 local steps of 8
images: 160,000 images seen in all) on the split, with `class-aware` off
(plain FedGAN) and on, one process per job with one torch thread,
`--processes` at a time (the real ServerApp and ClientApps on an in-process
grid). The final row of each run gives the per-class conditional accuracy,
the classes at 0.9 or more, fid, recall and coverage. `--centralized` adds
the centralized arm: one node that holds the pooled training data (every
split pools to the same 4,000 images) for the same 160,000 images (100
rounds of 200 steps, scored once at the end). Results go to
benchmarks/results/data/class-aware.json (a rerun skips the jobs done) and
the report to benchmarks/results/class-aware.md.
"""

from __future__ import annotations

import argparse
import statistics
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
RUNS_DIR = Path(__file__).resolve().parent / "runs" / "class-aware"
SPLITS = {"pathological": {"partitioner": "pathological", "classes-per-client": 2},
          "dirichlet-0.1": {"partitioner": "dirichlet", "dirichlet-alpha": 0.1},
          "dirichlet-0.3": {"partitioner": "dirichlet", "dirichlet-alpha": 0.3},
          "iid": {"partitioner": "iid"}}
# Keys of the results keep the True/False of the days class-aware was a switch.
ARMS = {"plain FedGAN": False, "class-aware": True}
CLASSES = 10


def run_one(split: str, class_aware: bool, seed: int, out: str, rounds: int) -> dict[str, Any]:
    """One default run on the split; its final quality row."""
    name = f"{split}-{'aware' if class_aware else 'plain'}-{seed}"
    run_config = {**SPLITS[split], "class-aware": "on" if class_aware else "off", "seed": seed,
                  "num-server-rounds": rounds, "wandb-mode": "disabled",
                  "audit-samples": 0, "output-dir": out, "run-name": name}
    run_dir, wall = run_in_process(run_config, NUM_CLIENTS)
    return {"wall_s": wall, **final_quality(run_dir, CLASSES)}


def run_centralized(seed: int, out: str, rounds: int) -> dict[str, Any]:
    """Centralized training on the pooled data for the images of `rounds` federated rounds."""
    steps_rounds = rounds * NUM_CLIENTS  # one node trains what 5 clients train together
    run_config = {"partitioner": "iid", "seed": seed, "num-server-rounds": steps_rounds,
                  "eval-every": steps_rounds, "sample-every": steps_rounds,
                  "fraction-evaluate": 0.0, "wandb-mode": "disabled", "audit-samples": 0,
                  "output-dir": out, "run-name": f"centralized-{seed}"}
    run_dir, wall = run_in_process(run_config, 1)
    return {"wall_s": wall, **final_quality(run_dir, CLASSES)}


def report(results: dict[str, dict[str, Any]], splits: list[str], seeds: list[int]) -> str:
    """The table: one row per split and arm, medians (min-max) over the seeds."""
    machines = Machines(results)
    arms: list[tuple[str, str, list[str]]] = []  # (split, arm, result keys)
    for split in splits:
        for arm, aware in ARMS.items():
            arms.append((split, arm, [f"{split}|{aware}|{s}" for s in seeds]))
    arms.append(("any (pooled data)", "centralized", [f"centralized|{s}" for s in seeds]))
    arms = [(split, arm, [k for k in keys if k in results]) for split, arm, keys in arms]
    arms = [arm for arm in arms if arm[2]]
    lines = ["| split | aggregation | classes >= 0.9 (per seed) | weakest class accuracy | "
             "fid | recall | coverage | seeds | machine |", "|---|---|---|---|---|---|---|---|---|"]
    per_class = ["", "Per-class conditional accuracy, median over the seeds:", "",
                 "| split | aggregation | " + " | ".join(str(c) for c in range(CLASSES)) + " |",
                 "|---|---|" + "---|" * CLASSES]
    for split, arm, keys in arms:
        rows = [results[k] for k in keys]
        classes = ", ".join(str(int(r["classes-at-0.9"])) for r in rows)
        weakest = [min(r["conditional-accuracy"]) for r in rows]
        lines.append(f"| {split} | {arm} | {classes} | {spread(weakest, '.2f')} | "
                     f"{spread([r['fid'] for r in rows])} | "
                     f"{spread([r['recall'] for r in rows], '.3f')} | "
                     f"{spread([r['coverage'] for r in rows], '.3f')} | {len(rows)} | "
                     f"{machines.tag(keys)} |")
        cells = [f"{statistics.median(r['conditional-accuracy'][c] for r in rows):.2f}"
                 for c in range(CLASSES)]
        per_class.append(f"| {split} | {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines + per_class + ["", *machines.legend()])


def main() -> None:
    """Run the jobs not done yet, then write the report from every result so far."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", action="append", choices=tuple(SPLITS), default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--centralized", action="store_true",
                        help="also the centralized arm (one node, the pooled data)")
    parser.add_argument("--quick", action="store_true",
                        help="2 rounds, under benchmarks/runs/ only")
    args = parser.parse_args()
    splits = args.split or ([] if args.centralized else ["pathological"])
    rounds = 2 if args.quick else 20
    out = RUNS_DIR / ("quick" if args.quick else "runs")
    jobs = {f"{split}|{aware}|{seed}": partial(run_one, split, aware, seed, str(out), rounds)
            for split in splits for aware in ARMS.values() for seed in args.seeds}
    if args.centralized:
        jobs.update({f"centralized|{seed}": partial(run_centralized, seed, str(out), rounds)
                     for seed in args.seeds})
    header = machine_header()
    results = run_jobs(jobs, results_file("class-aware", out, args.quick), args.processes)
    done = [s for s in SPLITS if any(k.startswith(s + "|") for k in results)]
    seeds = sorted({int(k.rsplit("|", 1)[1]) for k in results})
    text = (f"# Class-aware aggregation against plain FedGAN\n\n{header}\n\n"
            f"Last command: `{command_line()}` (the rows accumulate over runs of the script "
            f"in data/class-aware.json). Every default setting (5 clients, {rounds} rounds "
            f"of 200 local steps of 8 images: {rounds * 8_000:,} images seen) but the split and "
            "`class-aware` ('off': plain FedGAN; 'on': class-aware, which the default "
            "'auto' is on these splits); the centralized row is one node holding all the "
            f"clients' images, for the same {rounds * 8_000:,} images ({rounds * NUM_CLIENTS} "
            "rounds of 200 steps), the same for every split since each pools to the same "
            "data; one process and one torch thread per run; quality of the last round "
            "(1,000 samples).\n\n## Results\n\n" + report(results, done, seeds)
            + "\n")
    write_report("class-aware", text, out, args.quick)


if __name__ == "__main__":
    main()
