"""Each layer of the server's strategy on its own, around a strategy that records calls."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedgan_app.config import RunConfig
from fedgan_app.federation import client_app
from fedgan_app.federation.buffers import BufferSplit
from fedgan_app.federation.report import RoundReport
from fedgan_app.federation.rounds import RunRounds
from fedgan_app.federation.rules import RULES
from fedgan_app.federation.sampling import ClientSampling, PartitionSampler
from fedgan_app.federation.screen import ReplyScreen
from fedgan_app.federation.weights import WeightCap
from fedgan_app.federation.wrapper import Wrapper, find_layer
from fedgan_app.protocol.message import NUM_EXAMPLES, RoundConfig, buffer_keys
from harness.inprocess import InProcessGrid
from tests.test_rules import Inner
from tests.test_strategy import (
    BAD_REPLIES,
    COUNTER,
    G_WEIGHT,
    RUNNING_VAR,
    CollectingSink,
    _client_arrays,
    _models,
    _reference,
    _reply,
)

CAP = {"weight_check": "cap", "weight_cap_ratio": 3.0, "max_weight_share": 0.5}


def _train_message(node: int, arrays: ArrayRecord) -> Message:
    """A train request as Flower's FedAvg builds one."""
    return Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord()}),
                   dst_node_id=node, message_type="train")


# --- Wrapper ----------------------------------------------------------------------


def test_a_wrapper_delegates_and_layers_are_found_by_type() -> None:
    # Prepare
    inner = Inner(messages=[_train_message(1, ArrayRecord())])
    stack = Wrapper(Wrapper(inner))

    # Execute
    messages = list(stack.configure_train(2, ArrayRecord(), ConfigRecord(), None))

    # Assert
    assert len(messages) == 1 and inner.calls[0][:2] == ("configure_train", 2)
    assert find_layer(stack, Inner) is inner and stack.state() == {}
    with pytest.raises(LookupError, match="no BufferSplit"):
        find_layer(stack, BufferSplit)


# --- RunRounds: the round offset once, the round's config, the report ---------------


def test_run_rounds_numbers_once_sends_the_schedule_and_hands_the_report_over() -> None:
    # Prepare: round 1 of a run resumed after round 2; two messages sent, one reply back
    cfg = RunConfig.defaults(lr_decay_every=1, lr_decay_factor=0.5, local_steps=7)
    sink, report = CollectingSink(offset=2), RoundReport()
    inner = Inner(result=(ArrayRecord(), MetricRecord({"loss-d": 0.5})),
                  messages=[_train_message(1, ArrayRecord()), _train_message(2, ArrayRecord())],
                  evaluation=MetricRecord({"d-accuracy": 0.75}))
    rounds = RunRounds(inner, cfg, sink, report)

    # Execute
    rounds.configure_train(1, ArrayRecord(), ConfigRecord(), None)
    report.accepted, report.clients = 1, [{"node-id": 1}]
    rounds.aggregate_train(1, _replies_to(1))
    rounds.aggregate_evaluate(1, [])

    # Assert: every layer below sees the run's round 3 and its scheduled config
    assert [call[1] for call in inner.calls] == [3, 3, 3]
    lr_g, lr_d = cfg.lr_at(3)
    assert RoundConfig.from_record(inner.calls[0][3]) == RoundConfig(
        server_round=3, lr_generator=lr_g, lr_discriminator=lr_d, local_steps=7,
        batch_size=cfg.batch_size, seed=cfg.seed)
    row = sink.rows[3]
    assert list(row)[:3] == ["loss-d", "replies-accepted", "replies-dropped"]
    assert (row["replies-accepted"], row["replies-missing"], row["model-updated"]) == (1, 1, 1)
    assert sink.clients[3] == [{"node-id": 1}] and sink.states[3] == {}
    assert sink.evaluate[3] == {"client-d-accuracy": 0.75}
    assert report == RoundReport()  # cleared for the next round


def _replies_to(count: int) -> list[Message]:
    """Replies with only a metrics record."""
    request = Message(content=RecordDict(), dst_node_id=1, message_type="train")
    return [Message(content=RecordDict({"metrics": MetricRecord({NUM_EXAMPLES: 10})}),
                    reply_to=request) for _ in range(count)]


def test_a_round_report_clears_to_its_defaults() -> None:
    # Prepare
    report = RoundReport(accepted=3, dropped={"norm": 1}, capped=2, clients=[{"a": 1}])

    # Execute
    report.clear()

    # Assert: fresh containers, not shared ones
    assert report == RoundReport()
    report.dropped["x"] = 1
    assert RoundReport().dropped == {}


# --- ClientSampling ---------------------------------------------------------------


def test_without_sampling_the_grid_passes_through_and_only_scoring_rounds_evaluate() -> None:
    # Prepare: every node trains; quality every 3 rounds of 7
    cfg = RunConfig.defaults(eval_every=3, num_server_rounds=7, fraction_evaluate=1.0)
    inner = Inner()
    sampling = ClientSampling(inner, cfg, None, RoundReport())
    grid = InProcessGrid(client_app.app, num_nodes=2, run_config={})

    # Execute
    sampling.configure_train(1, ArrayRecord(), ConfigRecord(), grid)
    skipped = sampling.configure_evaluate(2, ArrayRecord(), ConfigRecord(), grid)
    sampling.configure_evaluate(3, ArrayRecord(), ConfigRecord(), grid)

    # Assert
    assert skipped == []
    assert [(call[0], call[1], call[4]) for call in inner.calls] == [
        ("configure_train", 1, grid), ("configure_evaluate", 3, grid)]
    assert grid.calls == []  # nobody was asked anything


def test_a_round_with_no_node_to_sample_sends_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: seeded sampling, and a grid whose nodes are all gone
    cfg = RunConfig.defaults(fraction_train=0.5, round_timeout=0.3)
    inner = Inner()
    sampling = ClientSampling(inner, cfg, PartitionSampler(cfg.seed, cfg.round_timeout),
                              RoundReport())
    grid = InProcessGrid(client_app.app, num_nodes=2, run_config={})
    grid.contexts.clear()

    # Execute
    with caplog.at_level(logging.WARNING):
        messages = list(sampling.configure_train(1, ArrayRecord(), ConfigRecord(), grid))

    # Assert: the layers below were not asked to send
    assert messages == [] and inner.calls == []
    assert "round 1: no node is connected: nothing is sent" in caplog.text


def test_the_wiring_s_query_is_counted_in_the_first_round_and_not_again() -> None:
    # Prepare
    cfg = RunConfig.defaults(fraction_train=0.5, round_timeout=5.0)
    report = RoundReport()
    sampler = PartitionSampler(cfg.seed, cfg.round_timeout)
    sampling = ClientSampling(Inner(), cfg, sampler, report)
    grid = InProcessGrid(client_app.app, num_nodes=4, run_config={})

    # Execute: the wiring asks, then two rounds
    sampling.connect(grid, 1)
    asked_before_round_1 = list(grid.calls)
    sampling.configure_train(1, ArrayRecord(), ConfigRecord(), grid)
    first = report.time_query_s
    sampling.configure_train(2, ArrayRecord(), ConfigRecord(), grid)

    # Assert: each node asked once, before round 1; only round 1 counts the seconds
    assert asked_before_round_1 == [(node, "query") for node in (101, 102, 103, 104)]
    assert [kind for _, kind in grid.calls] == ["query"] * 4
    assert sampler.claims == {101: 0, 102: 1, 103: 2, 104: 3}
    assert first > 0 and report.time_query_s == 0


# --- ReplyScreen ------------------------------------------------------------------


def test_the_screen_hands_on_only_the_replies_that_passed() -> None:
    # Prepare
    cfg = RunConfig.defaults(weight_check="cap")
    report = RoundReport()
    inner = Inner(result=(_reference(), MetricRecord()))
    screen = ReplyScreen(inner, cfg, _reference(), report)
    good = _reply(10, _client_arrays(1), 300)

    # Execute
    screen.aggregate_train(1, [good, BAD_REPLIES["nan"](), _reply(11, _client_arrays(2), 100)])

    # Assert: the rule saw two replies; the report has one row each, weights of the two
    (_, _, seen), = inner.calls
    assert [m.metadata.src_node_id for m in seen] == [10, 11]
    assert (report.accepted, report.dropped, report.validated) == (2, {"non-finite": 1}, 3)
    assert report.examples_total == 400
    assert [row["weight"] for row in report.clients] == [0.75, 0.0, 0.25]


def test_a_refused_round_leaves_every_weight_at_zero() -> None:
    # Prepare: the layers below refuse the round
    report = RoundReport()
    screen = ReplyScreen(Inner(result=(None, None)), RunConfig.defaults(weight_check="cap"),
                         _reference(), report)

    # Execute
    arrays, _ = screen.aggregate_train(1, [_reply(10, _client_arrays(1), 100)])

    # Assert
    assert arrays is None and report.accepted == 1
    assert [row["weight"] for row in report.clients] == [0.0]


# --- WeightCap --------------------------------------------------------------------


def test_the_weight_cap_lowers_a_huge_claim_for_every_layer_below() -> None:
    # Prepare: four claims of 100, one of 10**15
    report = RoundReport()
    inner = Inner()
    cap = WeightCap(inner, RunConfig.defaults(**CAP), report)
    replies = _replies_to(5)
    for msg, claim in zip(replies, [100, 100, 100, 100, 10**15], strict=True):
        msg.content["metrics"][NUM_EXAMPLES] = claim

    # Execute
    cap.aggregate_train(1, replies)

    # Assert: the huge claim counts as 3 x the median claim
    (_, _, seen), = inner.calls
    weights = np.array([m.content["metrics"][NUM_EXAMPLES] for m in seen])
    np.testing.assert_allclose(weights / weights.sum(), [1 / 7] * 4 + [3 / 7])
    assert report.capped == 1


def test_the_weight_cap_leaves_honest_claims_as_they_are() -> None:
    # Prepare
    report = RoundReport()
    cap = WeightCap(Inner(), RunConfig.defaults(**CAP), report)
    replies = _replies_to(3)

    # Execute
    cap.aggregate_train(1, replies)

    # Assert
    assert [m.content["metrics"][NUM_EXAMPLES] for m in replies] == [10, 10, 10]
    assert report.capped == 0


# --- BufferSplit ------------------------------------------------------------------


def _split(result: tuple[ArrayRecord | None, MetricRecord | None], robust: bool = False
           ) -> tuple[BufferSplit, Inner]:
    """BufferSplit around a recording rule."""
    inner = Inner(result=result, messages=[_train_message(1, ArrayRecord())])
    rule = RULES["median" if robust else "fedavg"]
    return BufferSplit(inner, rule, _reference(), buffer_keys(*_models())), inner


def _params(arrays: ArrayRecord) -> ArrayRecord:
    """The parameters of a packed model (no buffers)."""
    buffers = buffer_keys(*_models())
    return ArrayRecord({k: v for k, v in arrays.items() if k not in buffers})


def test_the_rule_sees_parameters_only_and_clients_get_the_whole_model() -> None:
    # Prepare
    split, inner = _split((None, None))
    model = _client_arrays(3)

    # Execute
    (message,) = split.configure_train(1, model, ConfigRecord(), None)

    # Assert
    assert set(inner.calls[0][2].keys()) == set(_params(model).keys())
    assert list(message.content["arrays"].keys()) == list(model.keys())


def test_buffers_are_the_weighted_mean_and_merged_back_in_the_model_s_dtypes() -> None:
    # Prepare: the rule answers with the first reply's parameters
    arrays = [_client_arrays(1), _client_arrays(2)]
    split, inner = _split((_params(arrays[0]), MetricRecord()))

    # Execute
    merged, _ = split.aggregate_train(1, [_reply(10, arrays[0], 100),
                                          _reply(11, arrays[1], 300)])

    # Assert
    (_, _, seen), = inner.calls
    assert all(set(m.content["arrays"].keys()) == set(_params(arrays[0]).keys())
               for m in seen)
    expected = 0.25 * arrays[0][RUNNING_VAR].numpy() + 0.75 * arrays[1][RUNNING_VAR].numpy()
    np.testing.assert_allclose(merged[RUNNING_VAR].numpy(), expected, rtol=1e-6)
    assert merged[COUNTER].dtype == _reference()[COUNTER].dtype
    assert list(merged.keys()) == list(_reference().keys())
    np.testing.assert_array_equal(merged[G_WEIGHT].numpy(), arrays[0][G_WEIGHT].numpy())


def test_a_rule_result_with_nan_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: the rule answers with NaN in one array
    params = _params(_client_arrays(1)).to_torch_state_dict()
    params[G_WEIGHT] = params[G_WEIGHT] * float("nan")
    split, _ = _split((ArrayRecord(params), MetricRecord()), robust=True)

    # Execute
    with caplog.at_level(logging.WARNING):
        merged = split.aggregate_train(2, [_reply(10, _client_arrays(1), 100)])

    # Assert
    assert merged == (None, None)
    assert (f"round 2: strategy 'median' produced NaN or Inf in 1 arrays (first: "
            f"'{G_WEIGHT}'); keeping the previous global model") in caplog.text
