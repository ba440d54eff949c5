r"""Old and new dependency pins side by side: the default run and the local step.

Run by hand from the repository root, alone on the machine, with one Python
per set of pins (each a venv holding the app's dependencies at those pins):

    .venv/bin/python benchmarks/pins.py --python old=/path/to/old-venv/bin/python \\
        --python new=.venv/bin/python

For each set, in one sitting and in the order given, a child process of that
Python runs the same code of this checkout: the default run through `flwr
run` (5 clients, every default setting; its wall time and its last round's
quality) and the app's local step alone (median images/s over interleaved
blocks, one thread). The rows are stored under their labels in
benchmarks/results/data/pins.json and the report is benchmarks/results/pins.md.
`--quick` runs 2 short rounds and writes under benchmarks/runs/pins/ instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from importlib import metadata
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

OUT = RUNS_DIR / "pins"
PACKAGES = ("flwr", "torch", "flwr-datasets", "datasets", "wandb", "torchmetrics",
            "imageio", "numpy")
QUALITY = ("fid", "classifier-score", "class-coverage", "conditional-accuracy")


def measure(label: str, quick: bool) -> dict[str, Any]:
    """In the child: the default run and the local step with this Python's packages."""
    from benchmarks.flwr_runs import FEDERATION_CLIENTS, default_setting, run_federation
    from benchmarks.local_step import APP_STEP, measure_step_variants
    from fedgan_app.federation.cores import simulation_resources, visible_gpus

    quiet_environment()
    os.environ.pop("OMP_NUM_THREADS", None)  # the federation picks threads
    resources = simulation_resources(FEDERATION_CLIENTS, len(os.sched_getaffinity(0)),
                                     visible_gpus())
    config = {"num-server-rounds": 2, "local-steps": 20} if quick else {}
    run = run_federation(f"pins-{label}", OUT, config, FEDERATION_CLIENTS, resources)
    last = run["rows"][-1] if run["rows"] else {}
    settings = {"batch-size": default_setting("batch-size")}
    step = measure_step_variants([("app", APP_STEP, {}, settings["batch-size"])],
                                 repeats=2 if quick else 5, block=5 if quick else 20)
    return {"label": label, "machine": machine_header(), "python": sys.executable,
            "versions": {p: metadata.version(p) for p in PACKAGES},
            "status": run["status"], "rounds": len(run["rows"]), "wall_s": run["wall_s"],
            "quality": {k: last.get(k) for k in QUALITY},
            "step_images_per_s": step["app"]["median"],
            "output_tail": run["output_tail"]}


def report(rows: dict[str, dict[str, Any]], command: str) -> str:
    """The markdown report of the stored rows."""
    names = list(rows)
    lines = ["# Dependency pins side by side", "",
             "Drawn by `benchmarks/pins.py` (its docstring says how): the same code of "
             "the app with each set of pins, in one sitting.", "",
             f"Command: `{command}`.", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for package in PACKAGES:
        lines.append(f"| {package} | " + " | ".join(rows[n]["versions"][package]
                                                  for n in names) + " |")
    lines.append("| default run: status | " + " | ".join(
        f"{rows[n]['status']} ({rows[n]['rounds']} rounds)" for n in names) + " |")
    lines.append("| default run: whole run s | " + " | ".join(
        f"{rows[n]['wall_s']:.0f}" for n in names) + " |")
    for key in QUALITY:
        lines.append(f"| default run: {key} | " + " | ".join(
            _fmt(rows[n]["quality"].get(key)) for n in names) + " |")
    lines.append("| local step, images/s (median, 1 thread) | " + " | ".join(
        f"{rows[n]['step_images_per_s']:.0f}" for n in names) + " |")
    if len(names) == 2:
        a, b = (rows[n] for n in names)
        lines += ["", f"Ratios {names[1]} / {names[0]}: whole run "
                  f"{b['wall_s'] / a['wall_s']:.2f}, local step "
                  f"{b['step_images_per_s'] / a['step_images_per_s']:.2f}."]
    lines += ["", *[f"- {n}: {rows[n]['python']}. {rows[n]['machine']}" for n in names]]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    """A quality value, or a dash when the round did not score it."""
    return "–" if value is None else f"{float(value):.3g}"


def main() -> None:
    """Measure each set of pins in a child process of its Python; write the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", default=[], metavar="LABEL=PATH",
                        help="a label and the Python of a venv with that set of pins")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.quick)))
        return
    rows: dict[str, dict[str, Any]] = {}
    for item in args.python:
        label, _, python = item.partition("=")
        command = [python, __file__, "--one", label, *(["--quick"] if args.quick else [])]
        child = subprocess.run(command, capture_output=True, text=True, check=False)
        if child.returncode != 0:
            sys.exit(f"{label}: the child failed:\n{child.stderr[-3000:]}")
        rows[label] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{label}: {rows[label]['status']}, {rows[label]['wall_s']:.0f} s, "
              f"{rows[label]['step_images_per_s']:.0f} images/s", flush=True)
    data, target = ((OUT / "pins.json", OUT / "pins.md") if args.quick else
                    (DATA_DIR / "pins.json", RESULTS_DIR / "pins.md"))
    target.parent.mkdir(parents=True, exist_ok=True)
    data.write_text(json.dumps(rows, indent=1))
    target.write_text(report(rows, command_line()))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
