"""The leakage audit of finished runs, beside two references: a copier and unseen real digits.

Run by hand from the repository root, after the runs to audit have finished:

    .venv/bin/python benchmarks/audit.py --run default=outputs/<run> [--run label=folder ...]

Each run folder is audited as ``python -m fedgan_app.audit --no-write`` does
(its latest checkpoint, the run's own partitions and held-out split,
`--samples` generated images). Two reference rows show the scale of the
memorization columns on the default data (the offline MNIST split 5 ways):
a *copier*, whose samples are training images with a little noise, and
*unseen real digits*, the images of the last partition searched against the
other four, which is what a generator that learnt the distribution perfectly
would draw. The table goes to benchmarks/results/audit.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, command_line, machine_header  # noqa: E402
from fedgan_app.audit import audit_run  # noqa: E402
from fedgan_app.config import RunConfig  # noqa: E402
from fedgan_app.files import write_text  # noqa: E402
from fedgan_app.privacy.audit import PREFIX, audit_data  # noqa: E402
from fedgan_app.privacy.leakage import memorization  # noqa: E402

COLUMNS = (("memorization/on-data", "on data"),
           ("memorization/closer-to-train", "closer to train"),
           ("memorization/closer-to-train-expected", "expected"),
           ("memorization/closer-to-train-excess", "excess"),
           ("memorization/near-copies", "near-copies"),
           ("memorization/real-near-copies", "real near-copies"),
           ("memorization/median-ratio", "median ratio"),
           ("membership/auc", "membership AUC"),
           ("membership/auc-max-client", "most exposed client"))


def references(samples: int) -> dict[str, dict[str, float]]:
    """The copier and unseen-real-digits rows on the default data (memorization only)."""
    members, held_out = audit_data(RunConfig.from_run_config({}), 5)
    train = torch.cat([members[pid].images for pid in range(4)])
    rng = torch.Generator().manual_seed(0)
    picked = train[torch.randperm(len(train), generator=rng)[:samples]]
    copies = (picked + 0.02 * torch.randn(picked.shape, generator=rng)).clamp(-1, 1)
    unseen = members[4].images[:samples]
    return {label: {PREFIX + k: v for k, v in memorization(images, train, held_out.images,
                                                            seed=42).row().items()}
            for label, images in (("copier (training images + noise)", copies),
                                  ("unseen real digits", unseen))}


def table(rows: dict[str, dict[str, float]]) -> str:
    """The markdown table of the rows."""
    head = "| row | " + " | ".join(name for _, name in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for label, row in rows.items():
        cells = [("–" if (v := row.get(PREFIX + key)) is None or v != v else f"{v:.3f}")
                 for key, _ in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Audit every run given, add the references, write the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", default=[], metavar="LABEL=FOLDER",
                        help="a finished run folder to audit, under a label")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--note", default="", help="where the runs came from, for the report")
    args = parser.parse_args()
    header = machine_header()
    rows: dict[str, dict[str, float]] = {}
    for spec in args.run:
        label, _, folder = spec.partition("=")
        rows[label] = audit_run(folder, samples=args.samples, write=False)
        print(f"{label}: audited in {rows[label][PREFIX + 'time-s']:.1f} s", flush=True)
    rows.update(references(args.samples))
    text = (f"# The leakage audit\n\n{header}\n\nCommand: `{command_line()}`. Each run's "
            "latest checkpoint, as `python -m fedgan_app.audit --no-write` audits it; the "
            "copier and the unseen real digits are memorization references on the default "
            "data (no discriminator: no membership columns). The columns are those of "
            f"docs/privacy.md. {args.note}\n\n## Audited runs and references\n\n"
            f"{table(rows)}\n")
    write_text(RESULTS_DIR / "audit.md", text)
    print(table(rows))
    print(f"wrote {RESULTS_DIR / 'audit.md'}")


if __name__ == "__main__":
    main()
