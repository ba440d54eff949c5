"""Prepare a node's data before a deployment: `python -m fedgan_app.data`.

Each SuperNode trains partition `partition-id` of the run's `dataset`, split
`num-partitions` ways by the run's partitioner and seed, and the server checks
every claim against the same partitioning. This command builds that
partitioning on the machine it runs on, fills the data cache (so the first
round does not wait for it), and prints each partition's size and label
counts, which must be the same on every machine:

    python -m fedgan_app.data --num-partitions 3 --run-config "dataset='/data/x.parquet'"
    python -m fedgan_app.data --num-partitions 3 --partition-id 1   # one node's view

`--run-config` takes the same "key=value ..." text as `flwr run --run-config`;
the settings that define the data (dataset, partitioner, dirichlet-alpha,
classes-per-client, seed) must be the run's.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from flwr.common.config import parse_config_args

from fedgan_app.config import RunConfig
from fedgan_app.data.prepared import (
    data_cache_path,
    load_server_split,
    partition_label_counts,
)
from fedgan_app.data.spec import DataError, partition_spec
from fedgan_app.settings import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    """Build the run's partitioning here; print each partition's size and label counts."""
    parser = argparse.ArgumentParser(prog="python -m fedgan_app.data",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-partitions", type=int, required=True,
                        help="the federation's num-partitions (its number of SuperNodes)")
    parser.add_argument("--partition-id", type=int, default=None,
                        help="print only this partition (a node's own)")
    parser.add_argument("--run-config", default="",
                        help="the run's settings, as for flwr run --run-config")
    args = parser.parse_args(argv)
    try:
        cfg = RunConfig.from_run_config(parse_config_args([args.run_config]))
        if args.num_partitions < 1:
            raise DataError(f"--num-partitions must be >= 1, got {args.num_partitions}")
        if args.partition_id is not None and not 0 <= args.partition_id < args.num_partitions:
            raise DataError(f"--partition-id {args.partition_id} is outside "
                            f"0..{args.num_partitions - 1}")
        spec = partition_spec(cfg, args.num_partitions)
        counts = partition_label_counts(spec)
        server = load_server_split(spec)
    except (ConfigError, DataError, ValueError) as exc:
        print(f"fedgan data: {exc}", file=sys.stderr)
        return 2
    wanted = range(len(counts)) if args.partition_id is None else [args.partition_id]
    print(f"{spec.dataset}, {spec.partitioner} partitioner, {len(counts)} partitions, "
          f"seed {spec.seed}; cached in {data_cache_path(spec)}")
    for i in wanted:
        print(f"partition {i}: {sum(counts[i])} images, labels {counts[i]}")
    print(f"server split: {len(server)} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
