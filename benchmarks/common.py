"""Shared pieces of the hand-run benchmarks: machine header, in-process runs, job pool.

Every benchmark that trains runs the real ServerApp `main` with the real
ClientApp on an in-process grid (harness.inprocess), so it trains and scores
exactly as the app does. Jobs run in separate single-thread processes (two
one-thread processes beat one two-thread process on these machines), and
their results accumulate in a JSON file, each with the machine it ran on (a
report tags each row with its machines), so an interrupted benchmark continues
where it stopped, on this machine or another.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deploy.processes import use_flower_settings
from fedgan_app.files import folder_lock, write_text

REPO_ROOT = Path(__file__).resolve().parent.parent
# Each result of run_jobs holds the machine it ran on under this key.
MACHINE_KEY = "machine"
NOT_RECORDED = "machine not recorded"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
RUNS_DIR = REPO_ROOT / "benchmarks" / "runs"
# The raw results every committed table is drawn from, committed beside it: a
# rerun in a fresh clone then adds to a table instead of redrawing it from the
# few jobs it ran itself (run folders stay in RUNS_DIR, which git ignores).
DATA_DIR = RESULTS_DIR / "data"


def results_file(name: str, runs_dir: Path, quick: bool) -> Path:
    """Where a benchmark keeps its results: DATA_DIR/<name>.json; a quick run: its runs."""
    return runs_dir / "results.json" if quick else DATA_DIR / f"{name}.json"


def write_report(name: str, text: str, runs_dir: Path, quick: bool) -> None:
    """Write a benchmark's report, RESULTS_DIR/<name>.md (a quick run: its runs), and print it."""
    target = (runs_dir if quick else RESULTS_DIR) / f"{name}.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text(target, text)
    print(text)


def quiet_environment() -> None:
    """No network probes, no W&B banner, one torch thread per process."""
    use_flower_settings()
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def cpu_model() -> str:
    """The CPU model as lscpu names it (or the platform's guess)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def machine() -> dict[str, Any]:
    """What a measurement runs on: CPU model, cores, GPU, versions, load and time (UTC)."""
    import flwr
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU",
            "torch": torch.__version__, "flwr": flwr.__version__,
            "python": platform.python_version(),
            "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
            "utc": f"{datetime.now(UTC):%Y-%m-%d %H:%M}"}


def machine_name(info: dict[str, Any]) -> str:
    """The machine and software of `machine()`, without the load and the time."""
    return (f"{info['cpu']}, {info['cores']} cores, {info['gpu']}; torch {info['torch']}, "
            f"flwr {info['flwr']}, Python {info['python']}")


def machine_header(info: dict[str, Any] | None = None) -> str:
    """One paragraph naming the machine: CPU model, cores, load, torch and flwr versions."""
    info = info or machine()
    return (f"Machine: {machine_name(info)}; load average {info['load']:.2f} at the start; "
            f"{info['utc']} UTC.")


class Machines:
    """The machines the results of a report ran on: a tag per machine, and the legend.

    Each result of `run_jobs` holds the machine it ran on (MACHINE_KEY); a
    result saved before they did has none and is tagged NOT_RECORDED.
    """

    def __init__(self, results: dict[str, dict[str, Any]]) -> None:
        self.of_job: dict[str, str | None] = {}
        self.times: dict[str, list[str]] = {}  # machine name -> its results' times
        for job, result in results.items():
            info = result.get(MACHINE_KEY) if isinstance(result, dict) else None
            name = machine_name(info) if info else None
            self.of_job[job] = name
            if name:
                self.times.setdefault(name, []).append(info["utc"])
        self.tags = {name: f"M{i}" for i, name in enumerate(self.times, 1)}

    def tag(self, jobs: Iterable[str]) -> str:
        """The tags of the machines the given jobs ran on ('–' when none has a result)."""
        names = {self.of_job[job] for job in jobs if job in self.of_job}
        tags = sorted((self.tags[n] for n in names if n), key=lambda tag: int(tag[1:]))
        tags += [NOT_RECORDED] if None in names else []
        return ", ".join(tags) or "–"

    def legend(self) -> list[str]:
        """Markdown lines: each tag's machine and the times of its results."""
        lines = ["Machines (the machine column names each row's):", ""]
        lines += [f"- {tag}: {name}; results from {min(self.times[name])} to "
                  f"{max(self.times[name])} UTC." for name, tag in self.tags.items()]
        if None in self.of_job.values():
            lines.append(f"- {NOT_RECORDED}: results saved before each result stored "
                         "its machine.")
        return [*lines, ""]


def run_in_process(run_config: dict[str, Any], num_nodes: int,
                   **grid_options: Any) -> tuple[Path, float]:
    """Run the app (real ServerApp and ClientApps) in this process; (run folder, wall s).

    `grid_options` go to InProcessGrid (e.g. partition_ids, num_partitions).
    """
    from fedgan_app.federation import client_app
    from fedgan_app.server_app import main
    from harness.inprocess import InProcessGrid, server_context

    grid = InProcessGrid(client_app.app, num_nodes=num_nodes, run_config=run_config,
                         **grid_options)
    start = time.perf_counter()
    main(grid, server_context(run_config))
    return Path(run_config["output-dir"]) / run_config["run-name"], time.perf_counter() - start


def read_rows(path: Path) -> list[dict[str, Any]]:
    """A CSV's rows, numbers parsed (empty cells dropped)."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            parsed: dict[str, Any] = {}
            for key, cell in row.items():
                if cell in ("", None):
                    continue
                try:
                    parsed[key] = float(cell)
                except ValueError:
                    parsed[key] = cell
            rows.append(parsed)
    return rows


def final_quality(run_dir: Path, classes: int = 10) -> dict[str, Any]:
    """A run's last metrics row: fid, precision, recall, density, coverage, per-class accuracy.

    `conditional-accuracy` is the list of the classes' accuracies (NaN where
    missing) and `classes-at-0.9` how many reach 0.9.
    """
    last = read_rows(run_dir / "metrics.csv")[-1]
    per_class = [last.get(f"conditional-accuracy/{c}", float("nan")) for c in range(classes)]
    return {**{m: last[m] for m in ("fid", "precision", "recall", "density", "coverage")},
            "conditional-accuracy": per_class,
            "classes-at-0.9": float(sum(1 for a in per_class if a >= 0.9))}


def run_jobs(jobs: dict[str, Callable[[], dict[str, Any]]], results_path: Path,
             processes: int) -> dict[str, dict[str, Any]]:
    """Run the jobs not yet in `results_path`, `processes` at a time; all results.

    Each job runs in a fresh process (spawned, one torch thread); its result,
    with the machine it ran on (MACHINE_KEY), is saved as soon as it ends, so a
    rerun skips it.
    """
    results: dict[str, dict[str, Any]] = (json.loads(results_path.read_text())
                                          if results_path.is_file() else {})
    todo = [name for name in jobs if name not in results]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} jobs already done; running "
          f"{len(todo)} with {processes} process(es)", flush=True)
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes, initializer=quiet_environment, maxtasksperchild=1) as pool:
        pending = {name: pool.apply_async(_call, (jobs[name],)) for name in todo}
        for name, handle in pending.items():
            results.update(_save_result(results_path, name, handle.get()))
            print(f"[{len(results)}/{len(jobs)}] {name}: "
                  + ", ".join(f"{k} {v:.4g}" for k, v in results[name].items()
                              if isinstance(v, float) and k in ("fid", "wall_s")),
                  flush=True)
    return results


def _save_result(results_path: Path, name: str, result: dict[str, Any]) -> dict[str, Any]:
    """Add one result to the file; every result the file now holds.

    Re-reads the file under a lock on its folder before writing, so two
    benchmark processes sharing a results file (say, one per core) keep each
    other's results instead of the last writer's copy replacing the file; the
    write is atomic and fsynced (fedgan_app.files).
    """
    with folder_lock(results_path.parent):  # made if missing
        saved = json.loads(results_path.read_text()) if results_path.is_file() else {}
        saved[name] = result
        write_text(results_path, json.dumps(saved, indent=1, sort_keys=True))
    return saved


def _call(job: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one job in a pool process (one torch thread); its result names the machine."""
    import torch

    torch.set_num_threads(1)
    info = machine()  # the load as the job starts
    return {**job(), MACHINE_KEY: info}


def spread(values: Iterable[float], digits: str = ".3g") -> str:
    """'median (min–max)' of the values ('–' when none; the value alone when one)."""
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return "–"
    if len(values) == 1:
        return format(values[0], digits)
    return (f"{format(statistics.median(values), digits)} "
            f"({format(min(values), digits)}–{format(max(values), digits)})")


def command_line() -> str:
    """The command that is running, as a user would type it."""
    return " ".join(["python", *[a if " " not in a else repr(a) for a in sys.argv]])
