"""Under load: the default run while another process burns one of the cores.

Run by hand from the repository root, with nothing else busy on the machine:

    .venv/bin/python benchmarks/under_load.py --label after
    .venv/bin/python benchmarks/under_load.py --label smoke --quick   # 2 short rounds

One `flwr run` of the default federation (what `./fedgan.sh run` starts) while a
Python loop pinned to one core burns it. The clients' training times come from
watching CoreShare's folder: each training client holds a file there, so a
file's lifetime is one client's local training. They are grouped into rounds
by start time (every round trains every client), and the last to start in a
round trained in its last wave. The row is stored under `--label` in
benchmarks/results/data/under-load.json (a rerun of a label replaces it), and
the "Under load" section of benchmarks/results/throughput.md is redrawn from
every stored row. For a before/after pair, run the script once with the code
before (`--label before`) and once after; `--rounds N` runs N rounds of the
default recipe instead of 20. `--quick` writes both files under
benchmarks/runs/under-load/ instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    DATA_DIR,
    RESULTS_DIR,
    RUNS_DIR,
    command_line,
    machine_header,
    quiet_environment,
)
from benchmarks.flwr_runs import FEDERATION_CLIENTS, run_federation  # noqa: E402
from fedgan_app.federation.cores import simulation_resources, visible_gpus  # noqa: E402

HOG = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"
OUT = RUNS_DIR / "under-load"
HEADING = "## Under load: the default run with one core busy"


class ClientWatch:
    """(start, end) of every client registration in CoreShare folders made after start.

    A registration is a file named by the client's process id; one process trains
    one client after another, so a registration is told apart by its mtime.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.root = Path(tempfile.gettempdir()) / "fedgan-cores"
        self.before = set(self.root.glob("*"))
        self.interval = interval
        self.spans: list[tuple[float, float]] = []
        self._open: dict[tuple[Path, float], float] = {}  # (file, mtime) -> start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> ClientWatch:
        """Start watching."""
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop watching; registrations still open end now."""
        self._stop.set()
        self._thread.join()
        self.spans += [(start, time.time()) for start in self._open.values()]
        self.spans.sort()

    def _watch(self) -> None:
        """Poll the folders of runs started after this watch began."""
        while not self._stop.wait(self.interval):
            now, seen = time.time(), {}
            for folder in set(self.root.glob("*")) - self.before:
                for path in folder.glob("*"):
                    try:
                        seen[path, path.stat().st_mtime] = path.stat().st_mtime
                    except OSError:  # unregistered meanwhile
                        pass
            for key in self._open.keys() - seen.keys():
                # Ended by now, or before the same process registered its next client.
                later = [start for (path, _), start in seen.items() if path == key[0]]
                self.spans.append((self._open.pop(key), min([now, *later])))
            for key, start in seen.items():
                self._open.setdefault(key, start)


def last_wave(spans: list[tuple[float, float]], clients: int, at_once: int
              ) -> tuple[list[float], list[float]]:
    """Training seconds of the last wave's clients and of the others, over every round."""
    short = clients % at_once or at_once
    last, others = [], []
    for start in range(0, len(spans) - clients + 1, clients):
        times = [end - begin for begin, end in spans[start:start + clients]]
        last += times[-short:]
        others += times[:-short]
    return last, others


def measure(label: str, hog_cpu: int, config: dict[str, Any]) -> dict[str, Any]:
    """One default run with a hog pinned to `hog_cpu`; its wall time and client times."""
    cores = len(os.sched_getaffinity(0))
    resources = simulation_resources(FEDERATION_CLIENTS, cores, visible_gpus())
    hog = subprocess.Popen([sys.executable, "-c", HOG, str(hog_cpu)])
    try:
        with ClientWatch() as watch:
            run = run_federation("under-load", OUT, config, FEDERATION_CLIENTS, resources)
    finally:
        hog.kill()
        hog.wait()
    last, others = last_wave(watch.spans, FEDERATION_CLIENTS,
                             int(resources["init-args-num-cpus"]))
    return {"label": label, "header": machine_header(), "command": command_line(),
            "status": run["status"], "rounds": len(run["rows"]), "wall_s": run["wall_s"],
            "hog_cpu": hog_cpu, "last_wave_s": last, "others_s": others,
            "output_tail": run["output_tail"]}


def section(rows: dict[str, dict[str, Any]]) -> str:
    """The markdown section of every stored row."""
    lines = [HEADING, "", "Drawn by `benchmarks/under_load.py` (its docstring says how); "
             "client training seconds from CoreShare's folder: median (min–max) over the "
             "rounds.", "", "| label | status | rounds | whole run s | last-wave client s "
             "| other clients s |", "|---|---|---|---|---|---|"]
    for row in rows.values():
        lines.append(f"| {row['label']} | {row['status']} | {row['rounds']} | "
                     f"{row['wall_s']:.0f} | {_spread(row['last_wave_s'])} | "
                     f"{_spread(row['others_s'])} |")
    lines.append("")
    lines += [f"- {row['label']}: `{row['command']}`, hog on CPU {row['hog_cpu']}. "
              f"{row['header']}" for row in rows.values()]
    return "\n".join(lines) + "\n"


def _spread(values: list[float]) -> str:
    """Median (min–max), or a dash without values."""
    if not values:
        return "–"
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def write_section(report: Path, data: Path) -> None:
    """Put the section in the report, in place of the old one (or at the end)."""
    text = report.read_text() if report.is_file() else ""
    new = section(json.loads(data.read_text()))
    start = text.find(HEADING)
    if start < 0:
        report.write_text(text.rstrip("\n") + "\n\n" + new if text else new)
        return
    end = text.find("\n## ", start + len(HEADING))
    report.write_text(text[:start] + new + ("\n" + text[end + 1:] if end >= 0 else ""))


def main() -> None:
    """Measure one labelled row, store it, redraw the section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="the row's name, e.g. before, after")
    parser.add_argument("--hog-cpu", type=int, default=min(os.sched_getaffinity(0)))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of the default recipe (default: the app's 20)")
    args = parser.parse_args()
    quiet_environment()
    os.environ.pop("OMP_NUM_THREADS", None)  # the federation picks threads
    data, report = ((OUT / "under-load.json", OUT / "throughput.md") if args.quick else
                    (DATA_DIR / "under-load.json", RESULTS_DIR / "throughput.md"))
    config = {"num-server-rounds": 2, "local-steps": 50} if args.quick else {}
    if args.rounds:
        config["num-server-rounds"] = args.rounds
    row = measure(args.label, args.hog_cpu, config)
    rows = json.loads(data.read_text()) if data.is_file() else {}
    rows[args.label] = row
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text(json.dumps(rows, indent=1))
    write_section(report, data)
    print(row["output_tail"])
    print(f"{args.label}: {row['status']}, {row['wall_s']:.0f} s; last wave "
          f"{_spread(row['last_wave_s'])} s; wrote {report}")


if __name__ == "__main__":
    main()
