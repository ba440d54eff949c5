"""Two clients, a few rounds, in process: the real ServerApp main and ClientApp."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedgan_app.config import RunConfig
from fedgan_app.data.prepared import load_train_pool
from fedgan_app.data.spec import partition_spec
from fedgan_app.federation import client_app as client_module
from fedgan_app.federation.client_app import OPT_KEYS
from fedgan_app.outputs.checkpoint import load_checkpoint
from fedgan_app.outputs.runfolder import read_rows
from fedgan_app.server_app import main
from harness.inprocess import InProcessGrid, server_context


def test_two_clients_two_rounds_keep_adam_state(tiny_run_config: dict) -> None:
    # Prepare: record each node's Adam step count as round 2 starts
    grid = InProcessGrid(client_module.app, num_nodes=2, run_config=tiny_run_config)
    steps_seen: dict[int, list[float]] = {}
    layouts: list[bool] = []  # each restored moment has its parameter's strides and device
    original_restore = client_module._restore_optimizer

    def spying_restore(context, key, optimizer):
        original_restore(context, key, optimizer)
        for group in optimizer.param_groups:
            for param in group["params"]:
                layouts.extend(v.stride() == param.stride() and v.device == param.device
                               for v in optimizer.state.get(param, {}).values()
                               if v.shape == param.shape)
        if key == OPT_KEYS["g"]:
            steps = [float(s["step"]) for s in optimizer.state.values()]
            steps_seen.setdefault(context.node_id, []).append(max(steps, default=0.0))

    client_module._restore_optimizer = spying_restore
    try:
        # Execute
        main(grid, server_context(tiny_run_config))
    finally:
        client_module._restore_optimizer = original_restore

    # Assert: round 1 starts with fresh Adam, round 2 continues its 3 steps
    local_steps = tiny_run_config["local-steps"]
    assert steps_seen == {101: [0.0, float(local_steps)], 102: [0.0, float(local_steps)]}
    # CUDA's fused Adam refuses moments whose strides differ from the (channels_last)
    # parameters' (found on an H200: every client failed from round 2 on).
    assert layouts and all(layouts)
    for context in grid.contexts.values():
        moments = context.state.array_records[OPT_KEYS["d"]].to_torch_state_dict()
        assert any(k.endswith("exp_avg_sq") for k in moments)
        assert all(torch.isfinite(v).all() for v in moments.values())

    run_dir = Path(tiny_run_config["output-dir"]) / "test-run"
    rows = read_rows(run_dir / "metrics.csv")
    assert [r["round"] for r in rows] == ["1", "2"]
    assert rows[1]["replies-accepted"] == "2.0" or float(rows[1]["replies-accepted"]) == 2
    assert float(rows[1]["fid"]) > 0  # eval-every 2: quality on the last round
    clients = read_rows(run_dir / "clients.csv")
    assert sorted((r["round"], r["partition-id"]) for r in clients) == [
        ("1", "0"), ("1", "1"), ("2", "0"), ("2", "1")]
    ckpt = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert ckpt.server_round == 2
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    assert (run_dir / "samples" / "round_0002.png").is_file()
    assert (run_dir / "progress.gif").is_file()


def test_a_client_failing_in_round_one_does_not_stop_the_run(tiny_run_config: dict) -> None:
    # Prepare: node 102 raises in round 1 only
    def fail(node_id, msg):
        return (node_id == 102 and msg.metadata.message_type == "train"
                and msg.content["config"]["server-round"] == 1)

    grid = InProcessGrid(client_module.app, num_nodes=2, run_config=tiny_run_config,
                         fail=fail)

    # Execute
    main(grid, server_context(tiny_run_config))

    # Assert
    rows = read_rows(Path(tiny_run_config["output-dir"]) / "test-run" / "metrics.csv")
    assert float(rows[0]["replies-failed"]) == 1 and float(rows[0]["replies-accepted"]) == 1
    assert float(rows[1]["replies-failed"]) == 0 and float(rows[1]["replies-accepted"]) == 2


def test_one_node_can_hold_one_partition_of_a_larger_split(tiny_run_config: dict) -> None:
    # Prepare: one node holding partition 3 of a 5-client pathological split (a
    # local-only baseline), and one holding all the data (a centralized one)
    config = {**tiny_run_config, "partitioner": "pathological", "num-server-rounds": 1}
    local = InProcessGrid(client_module.app, num_nodes=1, run_config=config,
                          partition_ids=[3], num_partitions=5)
    pooled_config = {**tiny_run_config, "num-server-rounds": 1, "run-name": "pooled"}
    pooled = InProcessGrid(client_module.app, num_nodes=1, run_config=pooled_config)

    # Execute
    main(local, server_context(config))
    main(pooled, server_context(pooled_config))

    # Assert: the local node trained on partition 3's two classes; the pooled node on
    # the whole training pool (5 partitions' worth)
    out = Path(tiny_run_config["output-dir"])
    (local_row,) = read_rows(out / tiny_run_config["run-name"] / "clients.csv")
    (pooled_row,) = read_rows(out / "pooled" / "clients.csv")
    assert local_row["partition-id"] == "3"
    assert int(local_row["classes"]) == 2
    five_clients = partition_spec(RunConfig.defaults(seed=tiny_run_config.get("seed", 0)), 5)
    assert int(pooled_row["num-examples"]) == len(load_train_pool(five_clients))
    assert int(pooled_row["classes"]) == 10


def test_partition_ids_must_fit_the_split(tiny_run_config: dict) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="partition ids"):
        InProcessGrid(client_module.app, num_nodes=1, run_config=tiny_run_config,
                      partition_ids=[5], num_partitions=5)
    with pytest.raises(ValueError, match="partition ids"):
        InProcessGrid(client_module.app, num_nodes=2, run_config=tiny_run_config,
                      partition_ids=[0], num_partitions=5)


def test_reset_optimizer_state_keeps_nothing_in_the_nodes(tiny_run_config: dict) -> None:
    # Prepare
    config = {**tiny_run_config, "client-optimizer-state": "reset"}
    grid = InProcessGrid(client_module.app, num_nodes=2, run_config=config)

    # Execute
    main(grid, server_context(config))

    # Assert: both nodes trained, and no Adam state stayed in their state
    clients = read_rows(Path(config["output-dir"]) / config["run-name"] / "clients.csv")
    assert len(clients) == 2 * config["num-server-rounds"]
    for context in grid.contexts.values():
        assert not set(OPT_KEYS.values()) & set(context.state.array_records)
        assert not any(k.endswith("-groups") for k in context.state.config_records)


def test_a_run_with_the_diversity_levers_trains_and_checkpoints_them(
        tiny_run_config: dict) -> None:
    # Prepare: minibatch std in D and the mode-seeking term in G's loss
    run_config = {**tiny_run_config, "d-minibatch-std": 4, "mode-seeking": 1.0}
    grid = InProcessGrid(client_module.app, num_nodes=2, run_config=run_config)

    # Execute
    main(grid, server_context(run_config))

    # Assert: both rounds took both replies; D's head reads one more channel
    run_dir = Path(run_config["output-dir"]) / "test-run"
    rows = read_rows(run_dir / "metrics.csv")
    assert [float(r["replies-accepted"]) for r in rows] == [2.0, 2.0]
    assert all(float(r["model-updated"]) == 1 for r in rows)
    ckpt = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert ckpt.config["d-minibatch-std"] == 4 and ckpt.config["mode-seeking"] == 1.0
    head = ckpt.state["discriminator.head.weight"]
    assert head.shape[1] == 2 * ckpt.config["d-width"] + 1
