"""The rule registry: one rule per 'strategy' setting, what each needs, and the quorum."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedgan_app.config import RunConfig
from fedgan_app.federation.rules import RULES, Quorum, min_replies, rule_of
from fedgan_app.protocol.message import ARRAYS_KEY, CONFIG_KEY, NUM_EXAMPLES
from fedgan_app.settings import STRATEGIES


class Inner(Strategy):
    """A strategy that records the rounds and replies that reach it."""

    def __init__(self, result: tuple[Any, Any] = (None, None),
                 messages: list[Message] | None = None,
                 evaluation: MetricRecord | None = None) -> None:
        self.result = result
        self.messages = messages or []
        self.evaluation = evaluation
        self.calls: list[tuple[Any, ...]] = []

    def summary(self) -> None:
        """Nothing to log."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Note the call; send the messages it was given."""
        self.calls.append(("configure_train", server_round, arrays, config, grid))
        return list(self.messages)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Note the call; answer as told."""
        self.calls.append(("aggregate_train", server_round, list(replies)))
        return self.result

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Note the call; send the messages it was given."""
        self.calls.append(("configure_evaluate", server_round, arrays, config, grid))
        return list(self.messages)

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        """Note the call; answer as told."""
        self.calls.append(("aggregate_evaluate", server_round, list(replies)))
        return self.evaluation


def _replies(count: int) -> list[Message]:
    """Replies holding only a metrics record (the quorum reads nothing else)."""
    request = Message(content=RecordDict(), dst_node_id=1, message_type="train")
    return [Message(content=RecordDict({"metrics": MetricRecord({NUM_EXAMPLES: 10})}),
                    reply_to=request) for _ in range(count)]


def test_the_registry_holds_one_rule_per_strategy_setting() -> None:
    # Execute
    names = list(RULES)

    # Assert: the same names as the setting's choices; the robust ones are the robust
    assert sorted(names) == sorted(STRATEGIES)
    assert all(rule.name == name for name, rule in RULES.items())
    assert {n for n, r in RULES.items() if r.robust} == {
        "median", "trimmed-mean", "krum", "multikrum", "bulyan"}
    assert rule_of(RunConfig.defaults(strategy="krum")) is RULES["krum"]


@pytest.mark.parametrize(("name", "f", "expected"), [
    ("fedavg", 3, (1, "1")), ("median", 1, (1, "1")), ("krum", 1, (5, "2f+3 = 5")),
    ("multikrum", 2, (7, "2f+3 = 7")), ("bulyan", 2, (11, "4f+3 = 11")),
])
def test_each_rule_says_how_many_replies_it_needs(name: str, f: int,
                                                   expected: tuple[int, str]) -> None:
    # Execute
    needed = min_replies(RunConfig.defaults(strategy=name, num_malicious_clients=f))

    # Assert
    assert needed == expected


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_rule_is_built_with_the_message_s_keys_and_fraction_one(name: str) -> None:
    # Execute
    strategy = RULES[name].build(RunConfig.defaults(strategy=name, num_malicious_clients=0), 4)

    # Assert: Flower's strategy reads and writes the records the protocol names
    assert (strategy.weighted_by_key, strategy.arrayrecord_key,
            strategy.configrecord_key) == (NUM_EXAMPLES, ARRAYS_KEY, CONFIG_KEY)
    assert strategy.fraction_train == 1.0 and strategy.min_available_nodes == 1


def test_multikrum_selects_all_but_f_of_the_sampled_by_default() -> None:
    # Prepare
    cfg = RunConfig.defaults(strategy="multikrum", num_malicious_clients=1,
                             fraction_train=0.5)

    # Execute
    strategy = RULES["multikrum"].build(cfg, 10)

    # Assert: 5 sampled of 10, one of them assumed hostile
    assert strategy.num_nodes_to_select == 4


@pytest.mark.parametrize(("settings", "replies", "reason"), [
    ({"min_train_replies": 2}, 1, "1 valid replies < min-train-replies=2"),
    ({"strategy": "krum", "num_malicious_clients": 1}, 4,
     "strategy 'krum' needs at least 2f+3 = 5 valid replies (num-malicious-clients=1), got 4"),
])
def test_the_quorum_keeps_the_model_when_too_few_replies_are_left(
    settings: dict[str, Any], replies: int, reason: str, caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare
    inner = Inner(result=(ArrayRecord(), MetricRecord()))
    quorum = Quorum(inner, RunConfig.defaults(**settings))

    # Execute
    with caplog.at_level(logging.WARNING):
        refused = quorum.aggregate_train(4, _replies(replies))
        accepted = quorum.aggregate_train(5, _replies(replies + 1))

    # Assert: the refused round never reached the rule; one more reply does
    assert refused == (None, None)
    assert [(call[0], call[1], len(call[2])) for call in inner.calls] == [
        ("aggregate_train", 5, replies + 1)]
    assert accepted == inner.result
    assert f"round 4: {reason}; keeping the previous global model" in caplog.text
