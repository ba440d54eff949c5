"""One trained generator, scored again: the evaluation's own noise, and the noise's scale.

Run by hand from the repository root, after benchmarks/diversity.py has
trained the runs it reads (their folders under benchmarks/runs/diversity/):

    .venv/bin/python benchmarks/sampling.py [--arm default] [--seeds 1 2 3] [--draws 6]
    .venv/bin/python benchmarks/sampling.py --run RUN_FOLDER [--run ...] [--scales 1 1.15]

For each run's last generator (checkpoints/latest.pt, its BatchNorm
statistics recomputed as the app does), the app's judge scores `--draws`
fresh sets of 1,000 balanced-label samples, each from its own noise, at each
noise scale: z ~ N(0, scale^2). Scale 1 is what the app draws; the spread
over draws at scale 1 is how much one quality row moves with the noise alone,
with the generator fixed. Scales above 1 widen the samples (the opposite of
the truncation trick), below 1 narrow them. Nothing is trained here.
Results go to benchmarks/results/data/sampling.json and the report to
benchmarks/results/sampling.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    command_line,
    machine,
    machine_header,
    results_file,
    spread,
    write_report,
)
from benchmarks.diversity import NUM_CLIENTS  # noqa: E402
from benchmarks.diversity import RUNS_DIR as DIVERSITY_RUNS  # noqa: E402
from fedgan_app.files import write_text  # noqa: E402

SCALES = (0.85, 1.0, 1.15, 1.3)
METRICS = ("fid", "precision", "recall", "density", "coverage", "weakest-class", "classes-at-0.9")
FORMATS = {"fid": ".3g", "classes-at-0.9": ".0f"}
EVAL_IMAGES = 1000
BATCH = 250


def rescore(run_dir: Path, draws: int, scales: list[float]) -> dict[str, Any]:
    """Every scale's quality rows over `draws` noise draws of one run's last generator."""
    import torch

    from fedgan_app.config import RunConfig
    from fedgan_app.data.prepared import load_server_split
    from fedgan_app.data.spec import partition_spec
    from fedgan_app.gan.models import gan_config
    from fedgan_app.gan.training import sample_images
    from fedgan_app.outputs.checkpoint import load_checkpoint
    from fedgan_app.quality.judge import QualityJudge, balanced_labels, generator_from
    from fedgan_app.quality.metrics import compute_quality, predict_probs

    torch.set_num_threads(1)
    settings = json.loads((run_dir / "run_config.json").read_text())
    cfg = RunConfig.from_run_config(settings)
    spec = partition_spec(cfg, NUM_CLIENTS)  # diversity.py's and class_aware.py's 5
    server = load_server_split(spec)
    judge = QualityJudge(cfg.dataset, cfg.seed, EVAL_IMAGES, server, spec)
    evaluator = judge.evaluator()
    cpu = torch.device("cpu")
    generator = generator_from(load_checkpoint(run_dir / "checkpoints" / "latest.pt").state,
                               gan_config(cfg, server.image_shape, server.num_classes),
                               cpu, cfg.seed)
    real = server.images[:EVAL_IMAGES]
    rows: dict[str, list[dict[str, float]]] = {}
    for scale in scales:
        for draw in range(draws):
            # The same noise for every scale of a draw: only its scale differs.
            z = torch.randn(EVAL_IMAGES, cfg.latent_dim,
                            generator=torch.Generator().manual_seed(10_000 + draw)) * scale
            fake = torch.cat([
                sample_images(generator, z[i:i + BATCH], cpu,
                              balanced_labels(min(BATCH, EVAL_IMAGES - i),
                                              generator.num_classes, i))
                for i in range(0, EVAL_IMAGES, BATCH)])
            quality = compute_quality(evaluator, real, fake)
            labels = balanced_labels(EVAL_IMAGES, generator.num_classes)
            hits = predict_probs(evaluator, fake).argmax(dim=1) == labels
            accuracy = [hits[labels == c].double().mean().item()
                        for c in range(generator.num_classes)]
            quality["weakest-class"] = min(accuracy)
            quality["classes-at-0.9"] = sum(1 for a in accuracy if a >= 0.9)
            rows.setdefault(f"{scale:g}", []).append({m: float(quality[m]) for m in METRICS})
    return {"rows": rows, "machine": machine(), "draws": draws}


def report(results: dict[str, dict[str, Any]]) -> str:
    """Per run and scale: the median (min-max) over the draws of each metric."""
    lines = ["| run | noise scale | " + " | ".join(METRICS) + " | draws |",
             "|---|---|" + "---|" * (len(METRICS) + 1)]
    for name, result in sorted(results.items()):
        for scale, rows in result["rows"].items():
            cells = [spread([r[m] for r in rows], FORMATS.get(m, ".3f")) for m in METRICS]
            lines.append(f"| {name} | {scale} | {' | '.join(cells)} | {len(rows)} |")
    lines += ["", "The spread at scale 1 with the generator fixed (sd over the draws, "
              "pooled over the runs): " + noise_line(results) + "."]
    return "\n".join(lines)


def noise_line(results: dict[str, dict[str, Any]]) -> str:
    """The mean over runs of each metric's standard deviation over draws at scale 1."""
    parts = []
    for metric in METRICS:
        sds = [statistics.stdev(r[metric] for r in result["rows"]["1"])
               for result in results.values() if len(result["rows"].get("1", [])) > 1]
        if sds:
            parts.append(f"{metric} {statistics.mean(sds):.3g}")
    return ", ".join(parts) or "one draw only"


def main() -> None:
    """Rescore the named runs not done yet, then write the report from every result so far."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arm", action="append", default=None,
                        help="benchmarks/diversity.py arm whose runs to rescore (default: default)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--run", action="append", default=[], type=Path,
                        help="a run folder to rescore (instead of the arm's runs)")
    parser.add_argument("--draws", type=int, default=6)
    parser.add_argument("--scales", type=float, nargs="+", default=list(SCALES))
    args = parser.parse_args()
    if args.draws < 2:
        parser.error("--draws must be at least 2 (the spread needs two)")
    path = results_file("sampling", DIVERSITY_RUNS, quick=False)
    results = json.loads(path.read_text()) if path.is_file() else {}
    header = machine_header()
    run_dirs = args.run or [DIVERSITY_RUNS / "runs" / f"{arm}-{seed}"
                            for arm in args.arm or ["default"] for seed in args.seeds]
    for run_dir in run_dirs:
        name = run_dir.name
        if name in results:
            continue
        if not (run_dir / "checkpoints" / "latest.pt").is_file():
            parser.error(f"no trained run in {run_dir} (checkpoints/latest.pt): train it "
                         "first, e.g. with benchmarks/diversity.py")
        results[name] = rescore(run_dir, args.draws, args.scales)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(results, indent=1, sort_keys=True))
        print(f"{name}: done", flush=True)
    text = (f"# One generator, scored again: noise draws and noise scale\n\n{header}\n\n"
            f"Last command: `{command_line()}` (the rows accumulate over runs of the "
            "script in data/sampling.json). Each run's last generator (the default-N runs "
            "trained by benchmarks/diversity.py, the split-named ones by "
            "benchmarks/class_aware.py), scored by the app's judge on fresh sets of 1,000 "
            "balanced-label samples, z ~ N(0, scale^2); the same draws at every scale. "
            "Cells: median (min–max) over the draws.\n\n## Results\n\n"
            + report(results) + "\n")
    write_report("sampling", text, DIVERSITY_RUNS, quick=False)


if __name__ == "__main__":
    main()
