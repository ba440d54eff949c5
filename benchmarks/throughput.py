"""Does every CPU-second train? The federation against the machine's limit.

Run by hand from the repository root, ALONE on the machine (nothing else busy):

    .venv/bin/python benchmarks/throughput.py                 # everything (~40 min)
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

Writes benchmarks/results/throughput.md (``--quick``: benchmarks/runs/).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
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
    read_rows,
)
from fedgan_app.federation.cores import simulation_resources, visible_gpus  # noqa: E402

PARTS = ("step", "limit", "federation", "layouts", "scale")
STEP_BLOCK = 20  # steps per timed block
STEP_REPEATS = 5  # interleaved blocks per variant


# --- the local step -------------------------------------------------------------


def _models_and_data(settings: dict[str, Any], batch: int, channels_last: bool
                     ) -> tuple[Any, Any, Any, Any, Iterator, Any]:
    """The default recipe's G, D, optimizers and a real partition's batches."""
    import torch

    from fedgan_app.config import RunConfig
    from fedgan_app.data.prepared import batch_iterator, load_partition
    from fedgan_app.data.spec import partition_spec
    from fedgan_app.gan.models import build_gan, gan_config
    from fedgan_app.gan.training import make_optimizers, to_channels_last

    cfg = RunConfig.defaults(**{k.replace("-", "_"): v for k, v in settings.items()})
    data = load_partition(partition_spec(cfg, 5), 0)
    generator, discriminator = build_gan(
        gan_config(cfg, data.image_shape, data.num_classes), cfg.seed)
    if channels_last:
        to_channels_last(generator, discriminator)
    opt_g, opt_d = make_optimizers(generator, discriminator, cfg.lr_generator,
                                   cfg.lr_discriminator, (cfg.adam_beta1, cfg.adam_beta2))
    rng = torch.Generator().manual_seed(0)
    return generator, discriminator, opt_g, opt_d, batch_iterator(data, batch, rng), cfg


def legacy_step(generator: Any, discriminator: Any, opt_g: Any, opt_d: Any,
                batches: Iterator, steps: int, rng: Any) -> None:
    """The local step as the app ran it before this work (kept here as the baseline).

    Four host syncs per step (``.item()``), separate D passes, contiguous
    memory; the default recipe of that time (BCE, BatchNorm in D).
    """
    import torch
    from torch.nn import functional as F

    for _ in range(steps):
        real, _ = next(batches)
        n = real.size(0)
        z = torch.randn(n, generator.latent_dim, generator=rng)
        ones, zeros = torch.ones(n), torch.zeros(n)
        fake = generator(z)
        logits_real = discriminator(real)
        logits_fake = discriminator(fake.detach())
        loss_d = (F.binary_cross_entropy_with_logits(logits_real, ones)
                  + F.binary_cross_entropy_with_logits(logits_fake, zeros))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        loss_g = F.binary_cross_entropy_with_logits(discriminator(fake), ones)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        [t.item() for t in (loss_d, loss_g, torch.sigmoid(logits_real).mean(),
                            torch.sigmoid(logits_fake).mean())]


# Speed-ups of the app's step, in the order the table adds them (each variant
# has every speed-up up to its own). The math is the same throughout
# (tests/test_training.py); "bf16" is not: it is measured, not used.
SPEEDUPS = ("channels_last", "nhwc_projection", "matmul", "unfold", "frozen_d", "fused_adam",
            "compiled")
APP_STEP = "fused_adam"  # the variant that is the app's own step


class _Plain:
    """The nets' layers as DCGAN writes them (the speed-ups switched off)."""

    @staticmethod
    def generator_forward(generator: Any, z: Any, labels: Any = None) -> Any:
        """G's first layer a transposed convolution of a 1x1 input."""
        code = generator.code(z, labels)
        return generator.net(code.view(code.size(0), -1, 1, 1))

    @staticmethod
    def features(discriminator: Any, x: Any) -> Any:
        """D's first layer a convolution."""
        return discriminator.net(x)

    @staticmethod
    def logits(discriminator: Any, h: Any, labels: Any = None) -> Any:
        """The projection term over the flattened features (NCHW order, whatever h's)."""
        out = discriminator.head(h).view(-1)
        if discriminator.conditioning == "projection":
            out = out + (discriminator.embed(labels) * h.flatten(1)).sum(dim=1)
        return out


def _step_runner(variant: str, settings: dict[str, Any], batch: int
                 ) -> Callable[[int], float]:
    """A function that runs `steps` steps of one variant and returns images/s.

    `variant` is "legacy" (the step before this work), "bf16" (the app's step
    under CPU bfloat16 autocast: other math), or one of SPEEDUPS: the app's
    step with that speed-up and every one before it in SPEEDUPS, the rest off
    ("contiguous": none of them).
    """
    import types

    import torch

    from fedgan_app.gan.training import StepRecipe, train_gan

    on = set(SPEEDUPS) if variant == "bf16" else (
        set(SPEEDUPS[:SPEEDUPS.index(variant) + 1]) if variant in SPEEDUPS else set())
    cl = "channels_last" in on
    generator, discriminator, opt_g, opt_d, batches, cfg = _models_and_data(
        settings, batch, cl)
    if "matmul" not in on:
        generator.forward = types.MethodType(_Plain.generator_forward, generator)
    if "unfold" not in on:
        discriminator.features = types.MethodType(_Plain.features, discriminator)
    if "nhwc_projection" not in on:
        discriminator.logits = types.MethodType(_Plain.logits, discriminator)
    if "frozen_d" not in on:  # D's weights collect gradients in G's step, as before
        discriminator.requires_grad_ = types.MethodType(lambda self, *a, **k: self,
                                                        discriminator)
    if "fused_adam" not in on:
        opt_g = torch.optim.Adam(generator.parameters(), **_adam_args(opt_g), foreach=True)
        opt_d = torch.optim.Adam(discriminator.parameters(), **_adam_args(opt_d),
                                 foreach=True)
    if "compiled" in on and variant != "bf16":
        generator, discriminator = torch.compile(generator), torch.compile(discriminator)
    rng = torch.Generator().manual_seed(1)
    cpu = torch.device("cpu")

    def run(steps: int) -> float:
        start = time.perf_counter()
        if variant == "legacy":
            legacy_step(generator, discriminator, opt_g, opt_d, batches, steps, rng)
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16"):
                train_gan(generator, discriminator, opt_g, opt_d, batches, steps, cpu, rng,
                          StepRecipe.from_settings(cfg), channels_last=cl)
        return steps * batch / (time.perf_counter() - start)

    return run


def _adam_args(optimizer: Any) -> dict[str, Any]:
    """The learning rate and betas of an Adam optimizer."""
    group = optimizer.param_groups[0]
    return {"lr": group["lr"], "betas": group["betas"]}


def measure_step_variants(variants: list[tuple[str, str, dict[str, Any], int]],
                          repeats: int, block: int) -> dict[str, dict[str, Any]]:
    """Interleaved blocks of every variant in this process: median images/s each."""
    import torch

    torch.set_num_threads(1)
    runners = {}
    for label, variant, settings, batch in variants:
        start = time.perf_counter()
        runners[label] = _step_runner(variant, settings, batch)
        runners[label](3)  # warm-up (and compilation)
        print(f"  {label}: ready in {time.perf_counter() - start:.1f}s", flush=True)
    rates: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(repeats):
        for label, run in runners.items():
            rates[label].append(run(block))
    return {label: {"median": statistics.median(r), "min": min(r), "max": max(r)}
            for label, r in rates.items()}


def sampling_rates(settings: dict[str, Any], repeats: int) -> dict[str, float]:
    """Images/s of sampling 1,000 images with no_grad vs inference_mode."""
    import torch

    generator = _models_and_data(settings, 32, False)[0]
    generator.eval()
    z = torch.randn(1000, generator.latent_dim)
    labels = (torch.arange(1000) % generator.num_classes) if generator.num_classes else None
    rates: dict[str, list[float]] = {"no_grad": [], "inference_mode": []}
    for _ in range(repeats):
        for mode, ctx in (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)):
            start = time.perf_counter()
            with ctx():
                for part in range(0, 1000, 500):
                    generator(z[part:part + 500],
                              None if labels is None else labels[part:part + 500])
            rates[mode].append(1000 / (time.perf_counter() - start))
    return {mode: statistics.median(r) for mode, r in rates.items()}


# --- the limit -------------------------------------------------------------------


def _limit_worker(settings: dict[str, Any], batch: int, threads: int, steps: int,
                  start_at: float, queue: Any) -> None:
    """One process of the limit: wait for the common start, run the app's step."""
    import torch

    torch.set_num_threads(threads)
    run = _step_runner(APP_STEP, settings, batch)
    run(3)
    while time.time() < start_at:
        time.sleep(0.01)
    began = time.perf_counter()
    run(steps)
    queue.put((steps * batch, time.perf_counter() - began))


def measure_limit(settings: dict[str, Any], batch: int, processes: int, threads: int,
                  steps: int) -> float:
    """Aggregate images/s of `processes` processes with `threads` threads each, in step."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    start_at = time.time() + 30  # all processes ready before the clock starts
    workers = [context.Process(target=_limit_worker,
                               args=(settings, batch, threads, steps, start_at, queue))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    results = [queue.get() for _ in workers]
    for worker in workers:
        worker.join()
    return sum(images for images, _ in results) / max(seconds for _, seconds in results)


# --- federations through flwr run ----------------------------------------------


class TreeMemory:
    """Samples the memory of a SuperLink's whole process tree every `interval` s.

    Each sample lists the processes (`ps`) and reads their /proc files: about
    0.1 s of CPU, so the federation's own timing uses a long interval.
    """

    def __init__(self, flower: Any, interval: float) -> None:
        self.flower = flower
        self.interval = interval
        self.samples: list[tuple[float, float, float]] = []  # (time, rss MB, pss MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        from deploy.processes import descendants, process_table

        links: list[int] = []
        while not self._stop.wait(self.interval):
            links = links or self.flower.superlink_pids()  # found once
            if not links:
                continue
            table = process_table()
            pids = [p for link in links for p in (link, *descendants(link, table))]
            rss = pss = 0.0
            for pid in pids:
                rss += _proc_kb(f"/proc/{pid}/status", "VmRSS:")
                pss += _proc_kb(f"/proc/{pid}/smaps_rollup", "Pss:")
            self.samples.append((time.time(), rss / 1024, pss / 1024))

    @property
    def peak(self) -> tuple[float, float]:
        """Peak (RSS sum, PSS sum) in MB."""
        if not self.samples:
            return float("nan"), float("nan")
        return max(s[1] for s in self.samples), max(s[2] for s in self.samples)


def _proc_kb(path: str, field: str) -> float:
    """A kB field of a /proc file (0 when the process is gone)."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(field):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def run_federation(name: str, out: Path, run_config: dict[str, Any], nodes: int,
                   resources: dict[str, float], timeout: float = 3600,
                   memory_interval: float = 5.0) -> dict[str, Any]:
    """One `flwr run` on a private SuperLink: wall time, rows, memory.

    `resources` are the simulation's Ray settings (cores.simulation_resources
    keys, e.g. client-resources-num-cpus), passed in --federation-config.
    """
    from harness.local_superlink import LocalFlower

    home = out / "flwr-home" / name
    shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(out / name, ignore_errors=True)
    flower = LocalFlower(home)
    config = {**run_config, "output-dir": str(out), "run-name": name,
              "wandb-mode": run_config.get("wandb-mode", "offline")}
    text = " ".join(f"{k}={_toml(v)}" for k, v in config.items())
    federation = " ".join([f"num-supernodes={nodes}",
                           *(f"{key}={value:g}" for key, value in resources.items())])
    try:
        with TreeMemory(flower, memory_interval) as memory:
            started = time.time()
            proc = flower.flwr("run", ".", "--stream", "--run-config", text,
                               "--federation-config", federation, timeout=timeout)
            ended = time.time()
        output = proc.stdout + proc.stderr
        run_id = next((int(w) for line in output.splitlines() if "started run" in line
                       for w in line.split() if w.isdigit()), None)
        status = flower.status(run_id) if run_id is not None else "did not start"
    finally:
        flower.stop()
    run_dir = out / name
    summary = (json.loads((run_dir / "summary.json").read_text())
               if (run_dir / "summary.json").is_file() else {})
    return {"name": name, "status": status, "started": started, "wall_s": ended - started,
            "rows": read_rows(run_dir / "metrics.csv"),
            "clients": read_rows(run_dir / "clients.csv"), "summary": summary,
            "peak_rss_mb": memory.peak[0], "peak_pss_mb": memory.peak[1],
            "memory": memory.samples, "config": config, "nodes": nodes,
            "output_tail": output[-2000:] if status != "finished:completed" else ""}


def _toml(value: Any) -> str:
    """A run-config value as `flwr run --run-config` reads it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"'{value}'"
    return repr(value)


def images_trained(run: dict[str, Any]) -> float:
    """Images the clients trained on (accepted and dropped replies), from clients.csv."""
    batch = run["config"].get("batch-size") or _default("batch-size")
    return sum(row.get("steps", 0.0) * batch for row in run["clients"]
               if row.get("status", "accepted") != "failed")


def _default(key: str) -> Any:
    """A setting's default, from the app's settings table."""
    from fedgan_app.config import SETTINGS_BY_KEY

    return SETTINGS_BY_KEY[key].default


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
    results["header"] = machine_header()
    default_batch = _default("batch-size")
    for part in args.parts:
        print(f"== {part}", flush=True)
        results[part] = PART_RUNNERS[part](args, cores, out, default_batch)
        results_path.write_text(json.dumps(results, indent=1, default=str))
    target = (out if args.quick else RESULTS_DIR) / "throughput.md"
    target.write_text(report(results, cores))
    under_load = DATA_DIR / "under-load.json"
    if not args.quick and under_load.is_file():  # the section benchmarks/under_load.py draws
        from benchmarks.under_load import write_section

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


# The default federation: what `./fedgan.sh run` starts.
FEDERATION_CLIENTS = 5


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
    """The markdown report of whatever parts have results."""
    lines = ["# Throughput: does every CPU-second train?", "",
             f"Command: `{command_line()}`", "", results.get("header", ""), ""]
    if "step" in results:
        lines += _step_section(results["step"])
    limit = None
    if "limit" in results:
        limit = max(results["limit"].values())
        lines += ["## The limit: the app's step with every core", "",
                  "| layout | images/s |", "|---|---|",
                  *[f"| {k} | {v:.0f} |" for k, v in results["limit"].items()],
                  "", f"Limit: **{limit:.0f} images/s**.", ""]
    if "federation" in results:
        lines += _federation_section(results["federation"], limit, cores)
    if "layouts" in results:
        lines += _layouts_section(results["layouts"], limit)
    if "scale" in results:
        lines += _scale_section(results["scale"])
    return "\n".join(lines) + "\n"


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
                                          or _default("batch-size"))
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
