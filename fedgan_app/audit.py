"""Audit a run for leakage, without Flower: ``python -m fedgan_app.audit``.

::

    python -m fedgan_app.audit outputs/<run> [--checkpoint latest|best]
                               [--samples N] [--num-partitions N] [--no-write]

Measures what the run's final models reveal about the clients' images
(`fedgan_app.privacy.leakage`): how many of G's samples lie nearer to a
training image than to a held-out one and how many are near-copies, and how
well D's score tells a training image from a held-out one (LOGAN's white-box
membership inference), for all clients and each one.

The models and settings come from the checkpoint; the images from the run's
own partitioning of its data set, which this machine must hold (the server
in simulation does; in a deployment, run it where the data is). The number
of partitions is the one the run's own audit recorded, else the highest
partition id in clients.csv plus one, else ``--num-partitions``.

The values are printed, merged into the run's summary.json (keys
``audit/...``) and shown on its dashboard page, unless ``--no-write``; a run
still writing the folder is left alone.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fedgan_app.files import LockHeld, RunLock, write_json
from fedgan_app.gan.models import pick_device
from fedgan_app.outputs.checkpoint import load_checkpoint
from fedgan_app.outputs.page import write_page
from fedgan_app.outputs.runfolder import RunFolder
from fedgan_app.privacy.audit import PREFIX, audit_data, audit_models, format_audit
from fedgan_app.sample import checkpoint_gan_config, checkpoint_run_config

DEFAULT_SAMPLES = 1000
MAX_SAMPLES = 100_000
MAX_PARTITIONS = 100_000


class AuditError(ValueError):
    """A run folder or an option the audit cannot use; the message names it."""


def audit_run(run_dir: Path | str, checkpoint: str = "latest", samples: int = DEFAULT_SAMPLES,
              num_partitions: int | None = None, device: str = "cpu",
              write: bool = True) -> dict[str, float]:
    """Audit a run folder's checkpoint; write the values into the folder unless `write` is off.

    Raises
    ------
    AuditError
        When the folder, its checkpoint or its data cannot be used (also a
        checkpoint or data error, reworded), or a run holds the folder.

    """
    folder = RunFolder(run_dir)
    if not folder.path.is_dir():
        raise AuditError(f"{folder.path} is not a run folder")
    if not 1 <= samples <= MAX_SAMPLES:
        raise AuditError(f"--samples must be between 1 and {MAX_SAMPLES}, got {samples}")
    path = folder.best_pt if checkpoint == "best" else folder.latest_pt
    lock = RunLock(folder.run_lock) if write else None
    try:
        if lock is not None:
            lock.acquire()
        loaded = load_checkpoint(path)
        cfg = checkpoint_run_config(loaded, path)
        gan_cfg = checkpoint_gan_config(loaded.state, cfg, path)
        partitions = num_partitions or _recorded_partitions(folder)
        members, held_out = audit_data(cfg, partitions)
        row = audit_models(loaded.state, loaded.ema_state, gan_cfg, cfg, members, held_out,
                           samples, pick_device(device))
        row[PREFIX + "round"] = float(loaded.server_round)
        if lock is not None:
            write_json(folder.summary_json, {**folder.summary(), **row}, indent=2,
                       sort_keys=True)
            write_page(folder.path)
        return row
    except LockHeld as exc:
        raise AuditError(f"a run is still writing {folder.path} ({exc}); audit it when it "
                         "has finished, or pass --no-write") from exc
    except AuditError:
        raise
    # CheckpointError, SampleError and DataError are ValueErrors; torch raises RuntimeError.
    except (ValueError, RuntimeError) as exc:
        raise AuditError(str(exc)) from exc
    finally:
        if lock is not None:
            lock.release()


def _recorded_partitions(folder: RunFolder) -> int:
    """The run's number of partitions: its own audit's, else from clients.csv."""
    recorded = folder.summary().get(PREFIX + "num-partitions")
    if isinstance(recorded, (int, float)) and 1 <= recorded <= MAX_PARTITIONS:
        return int(recorded)
    ids = [int(row["partition-id"]) for row in folder.clients_rows()
           if str(row.get("partition-id", "")).isdigit()]
    if not ids:
        raise AuditError(f"{folder.path} records no number of partitions (no audit in "
                         "summary.json, no partition ids in clients.csv): pass "
                         "--num-partitions")
    return max(ids) + 1


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: audit a run folder; exit 2 with a message on bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m fedgan_app.audit",
        description="Measure what a fedgan run's final G and D reveal about the clients' "
                    "images: memorization and membership inference.")
    parser.add_argument("run_dir", type=Path, help="a run folder, e.g. outputs/<run>")
    parser.add_argument("--checkpoint", choices=("latest", "best"), default="latest",
                        help="which checkpoint of the run (default latest: the final models)")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                        help=f"generated images to search (default {DEFAULT_SAMPLES})")
    parser.add_argument("--num-partitions", type=int, default=None,
                        help="the run's number of partitions (default: as recorded)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                        help="torch device (default cpu)")
    parser.add_argument("--no-write", dest="write", action="store_false",
                        help="only print: leave summary.json and the dashboard as they are")
    args = parser.parse_args(argv)
    try:
        if args.num_partitions is not None and not 1 <= args.num_partitions <= MAX_PARTITIONS:
            raise AuditError(f"--num-partitions must be between 1 and {MAX_PARTITIONS}, "
                             f"got {args.num_partitions}")
        row = audit_run(args.run_dir, args.checkpoint, args.samples, args.num_partitions,
                        args.device, args.write)
    except AuditError as exc:
        print(f"fedgan audit: {exc}", file=sys.stderr)
        return 2
    print(f"fedgan audit: round {int(row[PREFIX + 'round'])} of {args.run_dir}: "
          f"{format_audit(row)}")
    for key, value in sorted(row.items()):
        print(f"  {key[len(PREFIX):]:<34} {value:.4f}")
    if args.write:
        print(f"fedgan audit: written to {RunFolder(args.run_dir).summary_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
