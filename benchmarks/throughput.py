"""Does every CPU-second train? The federation against the machine's limit.

Run by hand from the repository root, ALONE on the machine (nothing else busy):

    .venv/bin/python benchmarks/throughput.py                 # everything
    .venv/bin/python benchmarks/throughput.py --parts step limit
    .venv/bin/python benchmarks/throughput.py --quick         # smoke run

Parts (all measured in one run, on one machine, side by side):

* ``step``: the local step's images/s in one process and one thread, each
  speed-up switched on in turn (interleaved blocks, median): the step as it
  was before this work, one host sync per call, the fused D pass, channels_last,
  torch.compile; the batch size's effect; no_grad vs inference_mode sampling.
* ``limit``: the app's own fast step with every core, as one process with all
  threads and as one single-thread process per core; the better is the limit.
* ``federation``: the default run through ``flwr run`` (a private SuperLink,
  the federation `./fedgan.sh run` uses), its images/s from its own
  clients.csv over the whole wall time (start-up and evaluation included),
  its ratio to the limit, and a per-round breakdown from its metrics.csv and
  summary.json.
* ``layouts``: the same federation, short, with each client layout.
* ``scale``: 10, 100 and 1,000 clients, 10 per round: start-up, round time,
  peak memory of the whole process tree; 50 rounds at 1,000 clients to show
  memory stays flat.

Writes benchmarks/results/throughput.md (``--quick``: benchmarks/runs/), each
section with the machine its part ran on. The step variants and the limit are
measured by benchmarks/local_step.py, the federations run by
benchmarks/flwr_runs.py; this script runs the parts and writes the report.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
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
from benchmarks.flwr_runs import (  # noqa: E402
    FEDERATION_CLIENTS,
    default_setting,
    images_trained,
    run_federation,
)
from benchmarks.local_step import (  # noqa: E402
    APP_STEP,
    STEP_BLOCK,
    STEP_REPEATS,
    measure_limit,
    measure_step_variants,
    sampling_rates,
)
from benchmarks.under_load import write_section  # noqa: E402
from fedgan_app.federation.cores import simulation_resources, visible_gpus  # noqa: E402

PARTS = ("step", "limit", "federation", "layouts", "scale")


def breakdown(run: dict[str, Any], limit: float) -> dict[str, float]:
    """Seconds of the run per part, from its own rows, clients and summary.

    The clients' phase of the rounds splits into the time the limit (the same
    step on every core, nothing else) would need for the images the clients
    trained, and the rest: waves that leave a core idle, more clients than
    cores sharing them, client set-up, Flower/Ray messaging.
    """
    rows, summary = run["rows"], run["summary"]
    compute = images_trained(run) / limit
    clients = sum(r.get("time-clients-s", 0.0) for r in rows)
    if len(rows) > 1:  # round 1's slow client phase is start-up, counted below
        clients -= rows[0].get("time-clients-s", 0.0) - statistics.median(
            r.get("time-clients-s", 0.0) for r in rows[1:])
    first_end = rows[0]["unix-time"] if rows else run["started"]
    startup = (first_end - run["started"]) - statistics.median(
        r["round-time-s"] for r in rows[1:]) if len(rows) > 1 else float("nan")
    parts = {
        "client training at the limit's speed (images / limit)": compute,
        "rest of the clients' phase: waves, shared cores, client set-up, messaging":
            clients - compute,
        "server validation and aggregation": summary.get("time/aggregate-s", 0.0),
        "server sampling (grids, EMA)": summary.get("time/sample-s", 0.0),
        "evaluation": summary.get("time/eval-s", 0.0),
        "checkpoints": summary.get("time/checkpoint-s", 0.0),
        "tracking (CSV, W&B) and views (plots, GIFs, page)":
            summary.get("time/outputs-s", 0.0) + summary.get("time/refresh-s", 0.0),
        "start-up before round 1 (beyond a normal round)": startup,
    }
    parts["rest (Flower between rounds, shut-down)"] = run["wall_s"] - sum(
        v for v in parts.values() if v == v)
    return parts


# --- the report ------------------------------------------------------------------


def main() -> None:
    """Run the chosen parts and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    quiet_environment()
    os.environ.pop("OMP_NUM_THREADS", None)  # the limit and the federation pick threads
    cores = os.cpu_count() or 1
    out = RUNS_DIR / ("throughput-quick" if args.quick else "throughput")
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results: dict[str, Any] = (json.loads(results_path.read_text())
                               if results_path.is_file() else {})
    # Each part names its own machine: parts of one report may run in other sittings.
    results.pop("header", None)  # an older file's: the last machine, not every part's
    machines = results.setdefault("machines", {})
    default_batch = default_setting("batch-size")
    for part in args.parts:
        print(f"== {part}", flush=True)
        machines[part] = machine_header()
        results[part] = PART_RUNNERS[part](args, cores, out, default_batch)
        results_path.write_text(json.dumps(results, indent=1, default=str))
    target = (out if args.quick else RESULTS_DIR) / "throughput.md"
    target.write_text(report(results, cores))
    under_load = DATA_DIR / "under-load.json"
    if not args.quick and under_load.is_file():  # the section benchmarks/under_load.py draws
        write_section(target, under_load)
    print(f"wrote {target}")


def part_step(args: argparse.Namespace, cores: int, out: Path, batch: int) -> dict:
    """The step's speed-ups, one at a time, and the batch size's effect."""
    old = OLD_DEFAULTS
    chain = [("one host sync per call", "contiguous"), ("+ channels_last", "channels_last"),
             ("+ the projection term in the features' layout", "nhwc_projection"),
             ("+ G's first layer as one matrix product", "matmul"),
             ("+ D's first layer as unfold + one matrix product", "unfold"),
             ("+ no D weight gradients in G's step", "frozen_d"),
             ("+ fused Adam (the app's step)", "fused_adam"),
             ("+ torch.compile", "compiled")]
    # The old recipe at its own batch (32): the step the throughput issue measured.
    old_batch = OLD_BATCH
    variants = [(f"old recipe (batch {old_batch}): the step before this work", "legacy", old,
                 old_batch)]
    variants += [(f"old recipe: {label}", v, old, old_batch) for label, v in chain]
    variants += [(f"default recipe (batch {batch}): {label}", v, {}, batch)
                 for label, v in chain]
    variants += [("default recipe: the app's step under bfloat16 autocast (other math, "
                  "not used)", "bf16", {}, batch)]
    # The batch size's effect, on the app's step.
    variants += [(f"default recipe, batch {b}", APP_STEP, {}, b)
                 for b in (16, 32, 64, 128) if b != batch]
    repeats, block = (2, 3) if args.quick else (STEP_REPEATS, STEP_BLOCK)
    return {"variants": measure_step_variants(variants, repeats, block),
            "sampling": sampling_rates({}, repeats)}


def part_limit(args: argparse.Namespace, cores: int, out: Path, batch: int) -> dict:
    """The app's step with every core: one process, and one process per core."""
    steps = 10 if args.quick else 200
    return {"one process, all threads": measure_limit({}, batch, 1, cores, steps),
            "one single-thread process per core": measure_limit({}, batch, cores, 1, steps)}


def part_federation(args: argparse.Namespace, cores: int, out: Path, batch: int) -> dict:
    """The default run through flwr run, whole (start-up and evaluation included)."""
    config: dict[str, Any] = {"num-server-rounds": 2, "local-steps": 5} if args.quick else {}
    resources = simulation_resources(FEDERATION_CLIENTS, cores, visible_gpus())
    return run_federation("default", out, config, FEDERATION_CLIENTS, resources)


def part_layouts(args: argparse.Namespace, cores: int, out: Path, batch: int) -> dict:
    """Short federations with each client layout."""
    rounds = 2 if args.quick else 4
    base = {"num-server-rounds": rounds, "eval-every": 1000, "fraction-evaluate": 0.0,
            "wandb-mode": "disabled"}
    clients = FEDERATION_CLIENTS
    slots = {"client-resources-num-cpus": 1}
    # Ray told the machine has one logical CPU per client: all of a round's at once.
    all_at_once = {"client-resources-num-cpus": 1, "init-args-num-cpus": clients}
    default = simulation_resources(clients, cores, visible_gpus())
    layouts = {
        f"one client at a time, {cores} threads": (
            {"client-threads": cores}, {"client-resources-num-cpus": cores}),
        f"{cores} clients at a time, 1 thread each": ({"client-threads": 1}, slots),
        f"{cores} clients at a time, threads shared": ({"client-threads": 0}, slots),
        f"all {clients} clients at once, 1 thread each": ({"client-threads": 1}, all_at_once),
        f"all {clients} clients at once, threads shared": ({"client-threads": 0}, all_at_once),
    }
    # The layout `./fedgan.sh run` picks on this machine, named as such.
    for label, (extra, resources) in list(layouts.items()):
        if extra == {"client-threads": 0} and _same_resources(resources, default, cores):
            layouts[label + " (the default)"] = layouts.pop(label)
    return {label: run_federation(f"layout-{i}", out, {**base, **extra}, clients, resources)
            for i, (label, (extra, resources)) in enumerate(layouts.items())}


def _same_resources(a: dict[str, float], b: dict[str, float], cores: int) -> bool:
    """Whether two simulation resource settings run the same clients at once."""
    def at_once(r: dict[str, float]) -> float:
        return r.get("init-args-num-cpus", cores) // r.get("client-resources-num-cpus", 1)
    return at_once(a) == at_once(b) and a.get("client-resources-num-gpus") == b.get(
        "client-resources-num-gpus")


def part_scale(args: argparse.Namespace, cores: int, out: Path, batch: int) -> dict:
    """10, 100 and 1,000 clients with 10 per round; 50 rounds at 1,000 for memory."""
    base = {"local-steps": 5, "eval-every": 1000, "sample-every": 1000,
            "fraction-evaluate": 0.0, "wandb-mode": "disabled"}
    sizes = (10, 100) if args.quick else (10, 100, 1000)
    # The federation `./fedgan.sh run` would use for n clients (10 of them per round).
    runs = {n: run_federation(f"scale-{n}", out, {**base, "num-server-rounds": 5,
                                                  "fraction-train": 10 / n}, n,
                              simulation_resources(n, cores), memory_interval=1.0)
            for n in sizes}
    if not args.quick:
        runs["1000x50"] = run_federation("scale-1000x50", out, {
            **base, "num-server-rounds": 50, "fraction-train": 0.01}, 1000,
            simulation_resources(1000, cores), memory_interval=1.0)
    return runs


PART_RUNNERS = {"step": part_step, "limit": part_limit, "federation": part_federation,
                "layouts": part_layouts, "scale": part_scale}
# The recipe the app had before this work: its step is the "before" of the step table.
OLD_BATCH = 32  # the batch size of the old recipe (the default until 2026-12-01)
OLD_DEFAULTS = {"g-width": 32, "d-width": 64, "d-norm": "batchnorm", "gan-loss": "bce",
                "diffaugment": "none", "conditional": False}


def report(results: dict[str, Any], cores: int) -> str:
    """The markdown report of whatever parts have results, each with its own machine."""
    lines = ["# Throughput: does every CPU-second train?", "",
             f"Command: `{command_line()}`", "",
             "Each section names the machine and time of its own part (`--parts` runs "
             "parts in separate sittings).", ""]
    if "step" in results:
        lines += _with_machine(results, "step", _step_section(results["step"]))
    limit = None
    if "limit" in results:
        limit = max(results["limit"].values())
        lines += _with_machine(results, "limit", [
            "## The limit: the app's step with every core", "",
            "| layout | images/s |", "|---|---|",
            *[f"| {k} | {v:.0f} |" for k, v in results["limit"].items()],
            "", f"Limit: **{limit:.0f} images/s**.", ""])
    if "federation" in results:
        lines += _with_machine(results, "federation",
                               _federation_section(results["federation"], limit, cores))
    if "layouts" in results:
        lines += _with_machine(results, "layouts",
                               _layouts_section(results["layouts"], limit))
    if "scale" in results:
        lines += _with_machine(results, "scale", _scale_section(results["scale"]))
    return "\n".join(lines) + "\n"


def _with_machine(results: dict[str, Any], part: str, section: list[str]) -> list[str]:
    """A section with the machine its part ran on under its heading."""
    machine = results.get("machines", {}).get(part) or "Machine not recorded."
    return [*section[:2], machine, "", *section[2:]]


def _step_section(step: dict[str, Any]) -> list[str]:
    """The step table: each speed-up's median images/s and its ratio to the baseline."""
    variants = step["variants"]
    first_old = next(iter(variants.values()))["median"]
    first_new = next((v["median"] for k, v in variants.items()
                      if k.startswith("default")), first_old)
    lines = ["## The local step (one process, one thread)", "",
             f"Median of {STEP_REPEATS} interleaved blocks of {STEP_BLOCK} steps each.", "",
             "| variant | images/s: median (min–max) | ratio |", "|---|---|---|"]
    for label, v in variants.items():
        base = first_old if label.startswith("old") else first_new
        lines.append(f"| {label} | {v['median']:.0f} ({v['min']:.0f}–{v['max']:.0f}) | "
                     f"{v['median'] / base:.2f} |")
    sampling = step["sampling"]
    lines += ["", "Sampling 1,000 images (eval mode): "
              + ", ".join(f"{k} {v:.0f} images/s" for k, v in sampling.items()), ""]
    return lines


def _federation_section(run: dict[str, Any], limit: float | None, cores: int) -> list[str]:
    """The default run: images/s over the whole wall time, ratio, breakdown."""
    images = images_trained(run)
    rate = images / run["wall_s"]
    rows = run["rows"]
    steady = [r for r in rows[1:] if "fid" not in r]
    steady_rate = (sum(images_trained({**run, "clients": [
        c for c in run["clients"] if c.get("round") == r["round"]]}) for r in steady)
        / sum(r["round-time-s"] for r in steady)) if steady else float("nan")
    lines = ["## The default run through `flwr run`", "",
             f"Status {run['status']}; {len(rows)} rounds, {images:.0f} images trained in "
             f"{run['wall_s']:.0f} s (from `flwr run` to its end: start-up, evaluation and "
             f"every output included).", "",
             f"- Federation: **{rate:.0f} images/s** over the whole run; {steady_rate:.0f} "
             "images/s in the rounds after the first without a quality evaluation."]
    if limit:
        lines.append(f"- Ratio to the limit: **{rate / limit:.2f}** whole run; "
                     f"{steady_rate / limit:.2f} in those rounds.")
    lines += ["", "| part | seconds | share of the wall time |", "|---|---|---|"]
    for part, seconds in (breakdown(run, limit) if limit else {}).items():
        lines.append(f"| {part} | {seconds:.1f} | {seconds / run['wall_s']:.1%} |")
    return [*lines, ""]


def _layouts_section(layouts: dict[str, Any], limit: float | None) -> list[str]:
    """Images/s of each layout in its rounds after the first."""
    lines = ["## Client layouts (5 clients)", "",
             "| layout | images/s (rounds 2..) | ratio to the limit | round time s |",
             "|---|---|---|---|"]
    for label, run in layouts.items():
        rows = run["rows"][1:]
        seconds = sum(r["round-time-s"] for r in rows)
        images = sum(c.get("steps", 0) * (run["config"].get("batch-size")
                                          or default_setting("batch-size"))
                     for c in run["clients"] if c.get("round", 0) > 1)
        rate = images / seconds if seconds else float("nan")
        ratio = f"{rate / limit:.2f}" if limit else "–"
        median = statistics.median(r["round-time-s"] for r in rows) if rows else float("nan")
        lines.append(f"| {label} | {rate:.0f} | {ratio} | {median:.1f} |")
    return [*lines, ""]


def _scale_section(scale: dict[str, Any]) -> list[str]:
    """Start-up, round time and peak memory per federation size."""
    lines = ["## Scale: 10 clients per round", "",
             "| clients | status | round 1 s | later rounds s (median) | extra start-up s | "
             "peak RSS MB (sum) | peak PSS MB (sum) |", "|---|---|---|---|---|---|---|"]
    for key, run in scale.items():
        rows = run["rows"]
        if not rows:
            lines.append(f"| {key} | {run['status']} | – | – | – | – | – |")
            continue
        first = rows[0]["unix-time"] - run["started"]
        later = statistics.median(r["round-time-s"] for r in rows[1:]) if len(rows) > 1 else 0
        lines.append(f"| {key} | {run['status']} | {first:.1f} | {later:.1f} | "
                     f"{first - later:.1f} | {run['peak_rss_mb']:.0f} | "
                     f"{run['peak_pss_mb']:.0f} |")
    if "1000x50" in scale and scale["1000x50"]["memory"]:
        samples = scale["1000x50"]["memory"]
        tenth = max(1, len(samples) // 10)
        marks = [f"{samples[i][2]:.0f}" for i in range(0, len(samples), tenth)]
        lines += ["", "PSS of the tree through the 50-round run (MB, evenly spaced samples): "
                  + ", ".join(marks)]
    return [*lines, ""]


if __name__ == "__main__":
    main()
