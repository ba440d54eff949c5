"""Seeded client sampling by partition: the query round, the seeded choice, hostile answers."""

from __future__ import annotations

import logging
import random
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message

from fedgan_app.config import RunConfig
from fedgan_app.federation import client_app
from fedgan_app.federation.rounds import RunRounds
from fedgan_app.federation.rules import RULES
from fedgan_app.federation.sampling import (
    EVALUATE_STREAM,
    TRAIN_STREAM,
    ClientSampling,
    PartitionSampler,
    SampledGrid,
    partition_order,
)
from fedgan_app.federation.strategy import build_strategy
from fedgan_app.federation.wrapper import find_layer
from fedgan_app.gan.models import GANConfig, build_gan
from fedgan_app.protocol.message import QUERY_RECORD_KEY, buffer_keys, pack_gan
from harness.inprocess import InProcessGrid
from tests.test_strategy import CollectingSink

ROUNDS = 6
REFERENCE = pack_gan(*build_gan(GANConfig(), seed=0))
BUFFERS = buffer_keys(*build_gan(GANConfig(), seed=0))


def _fedgan(offset: int = 0, **overrides: Any) -> tuple[RunRounds, CollectingSink]:
    """The strategy stack around FedAvg with these settings (a short round-timeout)."""
    # eval-every 1: every round asks clients for D's accuracy (its sampling is tested)
    cfg = RunConfig.defaults(**{"round_timeout": 0.3, "eval_every": 1, "weight_check": "cap",
                                **overrides})
    sink = CollectingSink(offset)
    return build_strategy(cfg, REFERENCE, BUFFERS, sink, 8), sink


def _grid(num_nodes: int = 8, node_ids: list[int] | None = None, **kwargs: Any
          ) -> InProcessGrid:
    """The real ClientApp on `num_nodes` in-process nodes."""
    return InProcessGrid(client_app.app, num_nodes=num_nodes, run_config={},
                         node_ids=node_ids, **kwargs)


def _partitions(grid: InProcessGrid, messages: list[Message]) -> list[int]:
    """The partitions the messages go to, sorted."""
    return sorted(int(grid.contexts[m.metadata.dst_node_id].node_config["partition-id"])
                  for m in messages)


def _rounds(strategy: RunRounds, grid: InProcessGrid, rounds: int = ROUNDS
            ) -> list[tuple[list[int], list[int]]]:
    """(train partitions, evaluate partitions) of each round's configure calls."""
    sampled = []
    for server_round in range(1, rounds + 1):
        train = list(strategy.configure_train(server_round, REFERENCE, ConfigRecord(), grid))
        evaluate = list(strategy.configure_evaluate(server_round, REFERENCE, ConfigRecord(),
                                                    grid))
        sampled.append((_partitions(grid, train), _partitions(grid, evaluate)))
    return sampled


def _queried(grid: InProcessGrid) -> list[int]:
    """Nodes a query message went to, in order."""
    return [node for node, kind in grid.calls if kind == "query"]


def _warnings(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_same_seed_samples_the_same_partitions_whatever_the_node_ids() -> None:
    # Prepare: the same federation twice, with node ids drawn at random as a simulation does
    ids = random.Random(7).sample(range(1, 2**40), 16)
    settings = {"seed": 3, "fraction_train": 0.5, "fraction_evaluate": 0.25}
    first, second = _grid(node_ids=ids[:8]), _grid(node_ids=ids[8:])

    # Execute
    sampled_first = _rounds(_fedgan(**settings)[0], first)
    sampled_second = _rounds(_fedgan(**settings)[0], second)
    other_seed = _rounds(_fedgan(**{**settings, "seed": 4})[0], _grid(node_ids=ids[:8]))

    # Assert: same partitions every round; 4 to train and 2 to evaluate of 8; the
    # choice changes from round to round and with the seed
    assert sampled_first == sampled_second
    assert all(len(train) == 4 and len(evaluate) == 2 for train, evaluate in sampled_first)
    assert len({tuple(train) for train, _ in sampled_first}) > 1
    assert other_seed != sampled_first
    # Each node was asked once, before round 1's sampling
    assert sorted(_queried(first)) == sorted(ids[:8])
    assert first.calls[:8] == [(node, "query") for node in sorted(ids[:8])]


def test_a_resumed_run_samples_as_the_uninterrupted_one() -> None:
    # Prepare: rounds 3.. of a run resumed after round 2 (the recorder's offset)
    settings = {"fraction_train": 0.5, "fraction_evaluate": 0.0}
    whole = _rounds(_fedgan(**settings)[0], _grid(), rounds=4)

    # Execute
    resumed = _rounds(_fedgan(offset=2, **settings)[0], _grid(), rounds=2)

    # Assert
    assert resumed == whole[2:]


@pytest.mark.parametrize("fraction_evaluate", [0.0, 1.0])
def test_fraction_one_sends_no_query(fraction_evaluate: float) -> None:
    # Prepare
    strategy, _ = _fedgan(fraction_train=1.0, fraction_evaluate=fraction_evaluate)
    grid = _grid(num_nodes=4)

    # Execute
    sampled = _rounds(strategy, grid, rounds=2)

    # Assert: no query, every node trains (and evaluates when asked to)
    assert find_layer(strategy, ClientSampling).sampler is None and _queried(grid) == []
    assert {kind for _, kind in grid.calls} <= {"train", "evaluate"}
    every = [0, 1, 2, 3]
    assert sampled == [(every, every if fraction_evaluate else [])] * 2


def test_only_client_evaluation_samples_then_training_takes_every_node() -> None:
    # Prepare: the defaults' shape: fraction-train 1, fraction-evaluate below 1
    strategy, sink = _fedgan(fraction_train=1.0, fraction_evaluate=0.5)
    grid = _grid(num_nodes=4)

    # Execute
    strategy.configure_train(1, REFERENCE, ConfigRecord(), grid)
    strategy.aggregate_train(1, [])
    sampled = _rounds(strategy, grid, rounds=2)

    # Assert: one query per node, before round 1's training (its time in round 1's
    # row); training takes every node, evaluation 2 of 4, seeded
    assert sorted(_queried(grid)) == [101, 102, 103, 104]
    assert grid.calls[:4] == [(node, "query") for node in (101, 102, 103, 104)]
    assert sink.rows[1]["time-query-s"] > 0
    assert [train for train, _ in sampled] == [[0, 1, 2, 3]] * 2
    assert [len(evaluate) for _, evaluate in sampled] == [2, 2]


def test_nodes_that_join_later_are_asked_once_and_then_sampled() -> None:
    # Prepare: 4 of 8 nodes connected in round 1
    strategy, _ = _fedgan(fraction_train=0.5, fraction_evaluate=0.0)
    grid = _grid(num_nodes=8)
    late = {node: grid.contexts.pop(node) for node in (105, 106, 107, 108)}
    strategy.configure_train(1, REFERENCE, ConfigRecord(), grid)

    # Execute: they join; two more rounds
    grid.contexts.update(late)
    sampled = _rounds(strategy, grid, rounds=3)[1:]

    # Assert: each node asked exactly once; round 2 and 3 sample 4 of all 8
    assert sorted(_queried(grid)) == list(range(101, 109))
    assert [len(train) for train, _ in sampled] == [4, 4]
    assert any(p >= 4 for train, _ in sampled for p in train)


def test_a_node_that_does_not_answer_is_left_out_logged_and_asked_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: in round 1 node 101 never answers and node 102 crashes on the query
    asked: dict[int, int] = {}

    def silent(node_id: int, reply: Message) -> Message | None:
        if reply.metadata.message_type == "query":
            asked[node_id] = asked.get(node_id, 0) + 1
            if node_id == 101 and asked[node_id] == 1:
                return None
        return reply

    def crash(node_id: int, msg: Message) -> bool:
        return (node_id == 102 and msg.metadata.message_type == "query"
                and msg.metadata.group_id == "1")

    strategy, sink = _fedgan(fraction_train=0.75, fraction_evaluate=0.0)
    grid = _grid(num_nodes=4, tamper=silent, fail=crash)

    # Execute
    with caplog.at_level(logging.WARNING):
        round_1 = list(strategy.configure_train(1, REFERENCE, ConfigRecord(), grid))
        strategy.aggregate_train(1, [])
        round_2 = list(strategy.configure_train(2, REFERENCE, ConfigRecord(), grid))

    # Assert: round 1 trains only the nodes that answered (3 of 4 sampled, 2 known);
    # the other two are asked again in round 2 and then sampled
    assert _partitions(grid, round_1) == [2, 3]
    assert sink.rows[1]["replies-missing"] == 2  # counted against the nodes sent to
    assert _queried(grid).count(101) == 2 and _queried(grid).count(102) == 2
    assert len(round_2) == 3 and {101, 102} & {m.metadata.dst_node_id for m in round_2}
    warnings = _warnings(caplog)
    assert "1 nodes did not answer the partition query within 0.3s (101)" in warnings
    assert "node 102 failed the partition query" in warnings
    assert "only 2 partitions have a node that answered" in warnings


def test_hostile_and_misconfigured_answers_are_refused_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: 6 nodes; node 103 claims node 102's partition, 104 one outside 0..5,
    # 105 another partitioning, 106 sends junk
    grid = _grid(num_nodes=6)
    grid.contexts[103].node_config["partition-id"] = 1
    grid.contexts[104].node_config["partition-id"] = 6
    grid.contexts[105].node_config["num-partitions"] = 3

    def junk(node_id: int, reply: Message) -> Message:
        if node_id == 106 and reply.metadata.message_type == "query":
            reply.content[QUERY_RECORD_KEY] = ConfigRecord(
                {"partition-id": True, "num-partitions": 6})
        return reply

    grid.tamper = junk
    sampler = PartitionSampler(seed=0, timeout=1.0)

    # Execute
    with caplog.at_level(logging.WARNING):
        sampler.learn(grid, list(grid.contexts), server_round=1)
        every = sampler.sample(list(grid.contexts), server_round=1, count=6, stream=-1)
        without_102 = sampler.sample([101, 103], server_round=1, count=6, stream=-1)

    # Assert: partitions 0 and 1 are sampleable; the duplicate stands in for 102
    assert sampler.num_partitions == 6
    assert sampler.claims == {101: 0, 102: 1, 103: 1}
    assert set(sampler.refused) == {104, 105, 106}
    assert sorted(every) == [101, 102] and sorted(without_102) == [101, 103]
    warnings = _warnings(caplog)
    assert "node 103 claims partition 1, which node 102 holds" in warnings
    assert "node 104 is never sampled: partition-id 6 is outside 0..5" in warnings
    assert "node 105 is never sampled: num-partitions 3 differs from the federation's 6" \
        in warnings
    assert "node 106 is never sampled: partition-id and num-partitions must be integers" \
        in warnings
    # Refused nodes are not asked again
    calls = len(grid.calls)
    sampler.learn(grid, list(grid.contexts), server_round=2)
    assert len(grid.calls) == calls


def test_when_no_node_answered_the_round_sends_nothing_and_keeps_the_model(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: every node crashes on the query
    strategy, sink = _fedgan(fraction_train=0.5, fraction_evaluate=0.5)
    grid = _grid(num_nodes=4, fail=lambda node, msg: msg.metadata.message_type == "query")

    # Execute
    with caplog.at_level(logging.WARNING):
        train = list(strategy.configure_train(1, REFERENCE, ConfigRecord(), grid))
        arrays, _ = strategy.aggregate_train(1, [])
        evaluate = list(strategy.configure_evaluate(1, REFERENCE, ConfigRecord(), grid))

    # Assert
    assert train == [] and evaluate == [] and arrays is None
    assert sink.rows[1]["model-updated"] == 0 and sink.rows[1]["replies-missing"] == 0
    assert "0 valid replies < min-train-replies=1" in _warnings(caplog)


def test_the_sampled_grid_shows_only_the_sampled_nodes() -> None:
    # Prepare
    grid = _grid(num_nodes=4)

    # Execute
    sampled = SampledGrid(grid, [103, 101])
    messages = list(RULES["fedavg"].build(RunConfig.defaults(), 4).configure_train(
        1, REFERENCE, ConfigRecord(), sampled))

    # Assert: Flower's FedAvg (fraction 1.0) sends to exactly those nodes
    assert sorted(sampled.get_node_ids()) == [101, 103]
    assert sorted(m.metadata.dst_node_id for m in messages) == [101, 103]


def test_a_lone_first_answer_cannot_set_the_federation_size(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: node 101 answers alone first, claiming a huge partitioning
    grid = _grid(num_nodes=4)
    grid.contexts[101].node_config["num-partitions"] = 10**12
    sampler = PartitionSampler(seed=0, timeout=1.0)
    sampler.learn(grid, [101], server_round=1)

    # Execute: the others join
    with caplog.at_level(logging.WARNING):
        sampler.learn(grid, list(grid.contexts), server_round=2)
        sampled = sampler.sample(list(grid.contexts), server_round=2, count=4, stream=-1)

    # Assert: the federation's size is what most nodes say; 101 is refused
    assert sampler.num_partitions == 4
    assert sorted(sampled) == [102, 103, 104] and set(sampler.refused) == {101}
    assert "node 101 is never sampled: num-partitions 1000000000000 differs from the " \
        "federation's 4" in _warnings(caplog)


def test_a_missing_partition_is_replaced_and_the_rest_of_the_choice_stays() -> None:
    # Prepare
    full = partition_order(9, 3, TRAIN_STREAM, range(10))

    # Execute: partition full[1] has no node this round
    without = partition_order(9, 3, TRAIN_STREAM, [p for p in range(10) if p != full[1]])

    # Assert: the same order less that partition; another round or stream differs
    assert without == [p for p in full if p != full[1]]
    assert sorted(full) == list(range(10))
    assert full != partition_order(9, 4, TRAIN_STREAM, range(10))
    assert full != partition_order(9, 3, EVALUATE_STREAM, range(10))


def test_the_partition_size_check_asks_each_node_once() -> None:
    # Prepare: every node trains every round, and claims are checked against partitions
    cfg = RunConfig.defaults(fraction_evaluate=0.0, conditional=False)  # as REFERENCE
    strategy = build_strategy(cfg, REFERENCE, BUFFERS, CollectingSink(), 4, num_classes=10,
                              partitions=lambda n: [[1] * 10] * n)
    grid = _grid(num_nodes=4)

    # Execute
    for server_round in (1, 2, 3):
        list(strategy.configure_train(server_round, REFERENCE, ConfigRecord(), grid))

    # Assert: one query per node, in round 1; every round trains all four
    queries = [call for call in grid.calls if call[1] == "query"]
    sampler = find_layer(strategy, ClientSampling).sampler
    assert len(queries) == 4 and sampler.queried == 4
    assert sampler.claims == {101: 0, 102: 1, 103: 2, 104: 3}


def test_the_wiring_asks_the_connected_nodes_before_the_first_round() -> None:
    # Prepare: seeded sampling of 4 of 8 nodes, the grid known when the strategy is built
    grid = _grid(num_nodes=8)
    cfg = RunConfig.defaults(fraction_train=0.5, fraction_evaluate=0.0, weight_check="cap",
                             round_timeout=5.0)
    sink = CollectingSink()

    # Execute
    strategy = build_strategy(cfg, REFERENCE, BUFFERS, sink, 8, grid=grid)
    asked_when_built = list(grid.calls)
    train = list(strategy.configure_train(1, REFERENCE, ConfigRecord(), grid))
    strategy.aggregate_train(1, [])

    # Assert: every node asked once, before round 1, which asks nobody and counts
    # the wiring's seconds in its row
    assert asked_when_built == [(node, "query") for node in range(101, 109)]
    assert _queried(grid) == list(range(101, 109))
    assert len(train) == 4 and sink.rows[1]["time-query-s"] > 0
