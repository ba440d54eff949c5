"""The server's strategy stack around Flower's rules: checks, buffers, robust rules, state."""

from __future__ import annotations

import dataclasses
import logging
import pickle
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)

from fedgan_app.config import RunConfig
from fedgan_app.federation import client_app
from fedgan_app.federation.buffers import BufferSplit
from fedgan_app.federation.rounds import RunRounds
from fedgan_app.federation.rules import RULES, check_federation
from fedgan_app.federation.screen import ReplyScreen
from fedgan_app.federation.strategy import build_strategy
from fedgan_app.federation.wrapper import find_layer
from fedgan_app.gan.models import GANConfig, build_gan
from fedgan_app.outputs.checkpoint import CheckpointError
from fedgan_app.protocol.message import buffer_keys, pack_gan
from fedgan_app.protocol.metadata import METADATA_KEY, encode_metadata
from fedgan_app.settings import STRATEGIES, ConfigError
from harness.attacks import OsSystem, honest_meta
from harness.inprocess import InProcessGrid

GAN = GANConfig()
G_WEIGHT = "generator.net.0.weight"
RUNNING_VAR = "generator.net.1.running_var"
COUNTER = "discriminator.net.3.num_batches_tracked"


class CollectingSink:
    """A RoundSink that keeps what the strategy pushes, round by round."""

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset
        self.rows: dict[int, dict[str, float]] = {}
        self.clients: dict[int, list[dict[str, Any]]] = {}
        self.states: dict[int, dict[str, Any]] = {}
        self.evaluate: dict[int, dict[str, float]] = {}

    def absolute(self, local_round: int) -> int:
        """Shift by the offset, as the Recorder does."""
        return local_round + self.offset

    def record_train(self, server_round: int, row: dict[str, float],
                     clients: list[dict[str, Any]], strategy_state: dict[str, Any]) -> None:
        """Keep a round's row, client rows and state."""
        self.rows[server_round] = row
        self.clients[server_round] = clients
        self.states[server_round] = strategy_state

    def record_evaluate(self, server_round: int, row: dict[str, float]) -> None:
        """Keep a round's evaluation row."""
        self.evaluate[server_round] = row


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    return build_gan(GAN, seed=0)


def _reference() -> ArrayRecord:
    return pack_gan(*_models())


def _client_arrays(seed: int) -> ArrayRecord:
    """A differently initialised pair with its own BatchNorm statistics."""
    state = pack_gan(*build_gan(GAN, seed=seed)).to_torch_state_dict()
    rng = torch.Generator().manual_seed(seed)
    for key, value in state.items():
        if key.endswith(("running_mean", "running_var")):
            state[key] = value + torch.rand(value.shape, generator=rng)
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(10 * seed)
    return ArrayRecord(state)


def _reply(node_id: int, arrays: ArrayRecord, num_examples: int,
           metadata: ConfigRecord | None = None, server_round: int = 1,
           **metric_changes: float) -> Message:
    """A train reply as a client would send it (partition = node id)."""
    request = Message(content=RecordDict(), dst_node_id=node_id, message_type="train")
    metrics = {"num-examples": num_examples, "loss-d": 1.0, "loss-g": 1.0, "d-x": 0.5,
               "d-gz": 0.5, "wall-time-s": 1.0, "images-per-s": 100.0}
    metrics.update(metric_changes)
    if metadata is None:
        metadata = encode_metadata(honest_meta(partition_id=node_id, num_examples=num_examples,
                                               server_round=server_round))
    # A copy: the strategies take arrays out of the replies.
    arrays = ArrayRecord(arrays.to_torch_state_dict())
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics),
                          "metadata": metadata})
    return Message(content=content, reply_to=request)


def _strategy(num_nodes: int = 5, offset: int = 0, configure: bool = True,
              **overrides: Any) -> tuple[RunRounds, CollectingSink]:
    """The strategy stack around the configured Flower rule, after configure_train of round 1.

    Claims are trusted as they are (weight-check 'cap' with both caps off) unless a
    test sets the weight settings: the weight checks have tests of their own.
    """
    overrides = {"weight_check": "cap", "weight_cap_ratio": 0.0, "max_weight_share": 1.0,
                 **overrides}
    cfg = RunConfig.defaults(**overrides)
    sink = CollectingSink(offset)
    strategy = build_strategy(cfg, _reference(), buffer_keys(*_models()), sink, num_nodes)
    if configure:
        _configure(strategy, _reference(), num_nodes)
    return strategy, sink


def _configure(strategy: RunRounds, arrays: ArrayRecord, num_nodes: int = 5) -> list[Message]:
    grid = InProcessGrid(client_app.app, num_nodes=num_nodes, run_config={})
    return list(strategy.configure_train(1, arrays, ConfigRecord(), grid))


def _weighted_mean(arrays: list[ArrayRecord], sizes: list[int], key: str) -> np.ndarray:
    weights = np.array(sizes) / sum(sizes)
    return sum(w * a[key].numpy() for w, a in zip(weights, arrays, strict=True))


# --- FedAvg: FedGAN's weighted mean ---------------------------------------------


def test_weighted_average_equals_hand_computation() -> None:
    # Prepare: 3 clients with 100, 300, 600 examples
    strategy, sink = _strategy()
    sizes = [100, 300, 600]
    arrays = [_client_arrays(seed) for seed in (1, 2, 3)]
    replies = [_reply(10 + i, a, n) for i, (a, n) in enumerate(zip(arrays, sizes, strict=True))]

    # Execute
    aggregated, metrics = strategy.aggregate_train(1, replies)

    # Assert: p_j = |R_j| / sum |R_k| on every array, BN buffers included, with the
    # model's own dtypes (the counter stays an integer)
    reference = _reference()
    assert list(aggregated.keys()) == list(reference.keys())
    for key in aggregated.keys():
        assert aggregated[key].dtype == reference[key].dtype, key
        np.testing.assert_allclose(aggregated[key].numpy(),
                                   _weighted_mean(arrays, sizes, key), rtol=1e-6, atol=1e-6)
    assert aggregated[COUNTER].numpy() == 10 * (1 * 0.1 + 2 * 0.3 + 3 * 0.6)
    assert metrics["loss-d"] == pytest.approx(1.0)
    row = sink.rows[1]
    assert row["num-examples-total"] == 1000 and row["model-updated"] == 1
    assert row["replies-accepted"] == 3 and row["replies-validated"] == 3
    rows = sink.clients[1]
    assert [r["partition-id"] for r in rows] == [10, 11, 12]
    assert [r["status"] for r in rows] == ["accepted"] * 3
    assert [r["weight"] for r in rows] == pytest.approx([0.1, 0.3, 0.6])
    assert all(r["reason"] == "" for r in rows)
    assert rows[0]["label-histogram"] == ";".join(["100"] + ["0"] * 9)
    assert sink.states[1] == {}  # FedAvg keeps no server optimizer state


# --- validation: every reply checked once ------------------------------------------


def _edited(edit: Any) -> ArrayRecord:
    state = _client_arrays(4).to_torch_state_dict()
    edit(state)
    return ArrayRecord(state)


BAD_REPLIES = {
    "nan": lambda: _reply(20, _edited(lambda s: s[G_WEIGHT].view(-1).__setitem__(
        0, float("nan"))), 500),
    "wrong shape": lambda: _reply(20, _edited(lambda s: s.__setitem__(
        "discriminator.net.0.weight", torch.zeros(3, 3))), 500),
    "missing key": lambda: _reply(20, _edited(lambda s: s.pop(
        "generator.net.1.running_mean")), 500),
    "extra key": lambda: _reply(20, _edited(lambda s: s.__setitem__(
        "generator.backdoor", torch.ones(2))), 500),
    "wrong dtype": lambda: _reply(20, _edited(lambda s: s.__setitem__(
        G_WEIGHT, s[G_WEIGHT].double())), 500),
    "inf metric": lambda: _reply(20, _client_arrays(4), 500, **{"loss-d": float("inf")}),
    "zero examples": lambda: _reply(20, _client_arrays(4), 0),
    "undecodable metadata": lambda: _reply(
        20, _client_arrays(4), 500, ConfigRecord({METADATA_KEY: b"\x80\x05garbage"})),
    "metadata disagrees on size": lambda: _reply(
        20, _client_arrays(4), 500, encode_metadata(honest_meta(num_examples=7))),
}


@pytest.mark.parametrize("name", list(BAD_REPLIES))
def test_bad_reply_is_dropped_and_counted(name: str) -> None:
    # Prepare: two good clients and one bad one
    strategy, sink = _strategy()
    good = [_client_arrays(1), _client_arrays(2)]
    replies = [_reply(10, good[0], 100), _reply(11, good[1], 300), BAD_REPLIES[name]()]

    # Execute
    aggregated, _ = strategy.aggregate_train(1, replies)

    # Assert: the result is exactly the average of the two good ones
    for key in (G_WEIGHT, "discriminator.net.0.weight", RUNNING_VAR):
        np.testing.assert_allclose(aggregated[key].numpy(),
                                   _weighted_mean(good, [100, 300], key), rtol=1e-6,
                                   atol=1e-7)
    assert all(np.isfinite(a.numpy()).all() for a in aggregated.values())
    row = sink.rows[1]
    assert (row["replies-dropped"], row["replies-accepted"], row["replies-validated"]) == (
        1, 2, 3)
    # clients.csv: every reply has a row; the dropped one says why, with weight 0
    rows = sink.clients[1]
    assert [r["status"] for r in rows] == ["accepted", "accepted", "dropped"]
    assert [r["weight"] for r in rows] == pytest.approx([0.25, 0.75, 0.0])
    assert rows[2]["node-id"] == 20 and rows[2]["reason"]


def test_hostile_metadata_reply_is_dropped_and_nothing_runs(tmp_path: Path) -> None:
    # Prepare
    marker = tmp_path / "pwned"
    hostile = ConfigRecord({METADATA_KEY: pickle.dumps(OsSystem(marker))})
    strategy, sink = _strategy(offset=2)
    replies = [_reply(10, _client_arrays(1), 100, server_round=3),
               _reply(11, _client_arrays(2), 100, hostile, server_round=3)]

    # Execute: local round 1 of a run resumed after round 2
    aggregated, _ = strategy.aggregate_train(1, replies)

    # Assert: nothing ran, and the round is numbered as the run's round 3
    assert not marker.exists()
    assert aggregated is not None
    assert sink.rows[3]["dropped-metadata"] == 1
    assert sink.clients[3][1]["reason"].startswith("metadata: memo opcode")


def test_too_few_valid_replies_keeps_previous_model() -> None:
    # Prepare
    strategy, sink = _strategy(min_train_replies=2)
    replies = [_reply(10, _client_arrays(1), 100), BAD_REPLIES["nan"]()]

    # Execute
    aggregated, _ = strategy.aggregate_train(1, replies)

    # Assert: nothing was aggregated, so no client has a weight
    assert aggregated is None
    assert sink.rows[1]["replies-accepted"] == 1 and sink.rows[1]["model-updated"] == 0
    assert [(r["status"], r["weight"]) for r in sink.clients[1]] == [
        ("accepted", 0.0), ("dropped", 0.0)]


def test_a_failed_reply_gets_a_row_with_only_its_node_id() -> None:
    # Prepare
    strategy, sink = _strategy()
    request = Message(content=RecordDict(), dst_node_id=30, message_type="train")
    failed = Message(Error(code=1, reason="boom"), reply_to=request)

    # Execute
    strategy.aggregate_train(1, [_reply(10, _client_arrays(1), 100), failed])

    # Assert
    assert sink.clients[1][1] == {"node-id": 30, "status": "failed",
                                  "reason": "error: boom", "weight": 0.0}
    assert sink.rows[1]["replies-failed"] == 1 and sink.rows[1]["replies-validated"] == 1


def _scaled(arrays: ArrayRecord, base: ArrayRecord, factor: float) -> ArrayRecord:
    """Return base + factor * (arrays - base) on float arrays: a scaled update."""
    out = {}
    for key, value in arrays.to_torch_state_dict().items():
        ref = base[key].numpy()
        out[key] = value if not value.is_floating_point() else torch.from_numpy(
            (ref + factor * (value.numpy() - ref)).astype(ref.dtype))
    return ArrayRecord(out)


def test_update_norm_screen_drops_a_boosted_update() -> None:
    # Prepare: configure_train sent `base`; three small updates and one boosted
    strategy, sink = _strategy()
    base = _reference()
    honest = [_scaled(_client_arrays(s), base, 0.01) for s in (1, 2, 3)]
    boosted = _scaled(_client_arrays(4), base, 10.0)
    replies = [_reply(10 + i, a, 100) for i, a in enumerate(honest)]
    replies.append(_reply(20, boosted, 100))

    # Execute
    aggregated, _ = strategy.aggregate_train(1, replies)

    # Assert
    assert sink.rows[1]["dropped-norm"] == 1
    dropped = [row for row in sink.clients[1] if row["status"] == "dropped"]
    assert len(dropped) == 1 and dropped[0]["node-id"] == 20
    assert dropped[0]["reason"].startswith("norm: update norm ")
    assert dropped[0]["partition-id"] == 20 and dropped[0]["weight"] == 0.0
    expected = np.mean([a[G_WEIGHT].numpy() for a in honest], axis=0)
    np.testing.assert_allclose(aggregated[G_WEIGHT].numpy(), expected, rtol=1e-5,
                               atol=1e-9)


# --- the inner strategies --------------------------------------------------------

INNER_CLASSES = {
    "fedavg": FedAvg, "fedavgm": FedAvgM, "fedprox": FedProx, "fedadam": FedAdam,
    "fedadagrad": FedAdagrad, "fedyogi": FedYogi, "median": FedMedian,
    "trimmed-mean": FedTrimmedAvg, "krum": Krum, "multikrum": MultiKrum, "bulyan": Bulyan,
}


def test_every_strategy_setting_builds_its_flower_strategy_with_its_settings() -> None:
    # Prepare
    cfg = {"server_lr": 0.3, "server_momentum": 0.7, "server_eta": 0.02,
           "server_beta1": 0.8, "server_beta2": 0.95, "server_tau": 1e-4,
           "proximal_mu": 0.5, "trim_fraction": 0.3, "num_malicious_clients": 0}

    # Execute
    inner = {name: RULES[name].build(RunConfig.defaults(strategy=name, **cfg), 5)
             for name in STRATEGIES}

    # Assert
    assert {n: type(s) for n, s in inner.items()} == INNER_CLASSES
    assert (inner["fedavgm"].server_learning_rate, inner["fedavgm"].server_momentum) == (
        0.3, 0.7)
    assert inner["fedprox"].proximal_mu == 0.5
    assert (inner["fedadam"].eta, inner["fedadam"].beta_1, inner["fedadam"].beta_2,
            inner["fedadam"].tau) == (0.02, 0.8, 0.95, 1e-4)
    assert (inner["fedyogi"].beta_1, inner["fedadagrad"].eta) == (0.8, 0.02)
    assert inner["trimmed-mean"].beta == 0.3
    assert inner["multikrum"].num_nodes_to_select == 5  # 0: all but f = 0 of 5


def test_fedprox_sends_mu_and_every_client_gets_the_whole_model() -> None:
    # Prepare
    strategy, _ = _strategy(strategy="fedprox", proximal_mu=0.25, num_nodes=2)
    arrays = _client_arrays(3)

    # Execute
    messages = _configure(strategy, arrays, num_nodes=2)

    # Assert: buffers travel to the clients although the inner strategy never saw them
    for msg in messages:
        assert msg.content["config"]["proximal-mu"] == 0.25
        assert list(msg.content["arrays"].keys()) == list(arrays.keys())
        np.testing.assert_array_equal(msg.content["arrays"][RUNNING_VAR].numpy(),
                                      arrays[RUNNING_VAR].numpy())


def test_configure_train_sends_schedule_and_settings() -> None:
    # Prepare: round 1 of a run resumed after round 2 is the run's round 3
    strategy, _ = _strategy(offset=2, lr_decay_every=1, lr_decay_factor=0.5, local_steps=7,
                              lr_generator=2e-4)

    # Execute
    messages = _configure(strategy, _reference(), num_nodes=2)

    # Assert
    config = messages[0].content["config"]
    assert config["server-round"] == 3
    assert config["lr-generator"] == pytest.approx(2e-4 / 4)
    assert config["local-steps"] == 7 and config["seed"] == 42
    assert {m.metadata.dst_node_id for m in messages} == {101, 102}


class SpyFedAdam(FedAdam):
    """Flower's FedAdam that remembers which arrays it was given."""

    seen: list[set[str]] = []

    def aggregate_train(self, server_round, replies):  # noqa: ANN001, ANN201
        """Note the keys of every reply, then aggregate as FedAdam does."""
        replies = list(replies)
        self.seen.append({k for m in replies for k in m.content["arrays"].keys()})
        return super().aggregate_train(server_round, replies)


def test_buffers_never_reach_the_server_optimizer_and_are_plainly_averaged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: FedAdam (Flower's) behind the stack, three clients
    cfg = RunConfig.defaults(strategy="fedadam", weight_check="cap", weight_cap_ratio=0.0,
                             max_weight_share=1.0)
    sink = CollectingSink()
    inner = SpyFedAdam(eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3)
    monkeypatch.setitem(RULES, "fedadam",
                        dataclasses.replace(RULES["fedadam"], build=lambda c, n: inner))
    strategy = build_strategy(cfg, _reference(), buffer_keys(*_models()), sink, 5)
    _configure(strategy, _reference())
    sizes = [100, 300, 600]
    arrays = [_client_arrays(seed) for seed in (1, 2, 3)]

    # Execute
    aggregated, _ = strategy.aggregate_train(1, [_reply(10 + i, a, n) for i, (a, n)
                                                 in enumerate(zip(arrays, sizes, strict=True))])

    # Assert: the optimizer saw parameters only; buffers are their plain weighted
    # mean, parameters took FedAdam's step (not the mean)
    buffers = buffer_keys(*_models())
    assert SpyFedAdam.seen[-1] == set(_reference().keys()) - buffers
    for key in buffers:
        np.testing.assert_allclose(aggregated[key].numpy(),
                                   _weighted_mean(arrays, sizes, key), rtol=1e-6)
    assert not np.allclose(aggregated[G_WEIGHT].numpy(),
                           _weighted_mean(arrays, sizes, G_WEIGHT))
    assert set(sink.states[1]) == {"strategy"} | {
        f"{slot}/{key}" for slot in ("m_t", "v_t") for key in SpyFedAdam.seen[-1]}


@pytest.mark.parametrize(("name", "num_honest", "f"), [
    ("median", 4, 0), ("trimmed-mean", 4, 0), ("krum", 4, 1), ("bulyan", 6, 1)])
def test_robust_rules_resist_one_sign_flipped_client(name: str, num_honest: int,
                                                     f: int) -> None:
    # Prepare: honest clients near the global model, 1 flipped and boosted (every
    # float array, BatchNorm statistics included); bulyan needs 4f+3 = 7 replies
    strategy, sink = _strategy(strategy=name, trim_fraction=0.2, num_malicious_clients=f,
                               max_update_norm_ratio=0.0)
    base = _reference()
    honest = [_scaled(_client_arrays(s), base, 0.01) for s in range(1, num_honest + 1)]
    attacker = _scaled(_client_arrays(9), base, -5.0)
    replies = [_reply(10 + i, a, 100) for i, a in enumerate(honest + [attacker])]

    # Execute
    aggregated, _ = strategy.aggregate_train(1, replies)

    # Assert: closer to the honest mean than plain averaging, for a parameter and
    # for a buffer (the coordinate-wise median of the five)
    assert sink.rows[1]["model-updated"] == 1
    for key in (G_WEIGHT, RUNNING_VAR):
        honest_mean = np.mean([a[key].numpy() for a in honest], axis=0)
        plain_mean = np.mean([a[key].numpy() for a in honest + [attacker]], axis=0)
        robust_err = np.linalg.norm(aggregated[key].numpy() - honest_mean)
        assert robust_err < 0.5 * np.linalg.norm(plain_mean - honest_mean), key
    np.testing.assert_array_equal(
        aggregated[RUNNING_VAR].numpy(),
        np.median([a[RUNNING_VAR].numpy() for a in honest + [attacker]], axis=0))


@pytest.mark.parametrize(("name", "nodes", "f", "message"), [
    ("krum", 4, 1, "2f\\+3 = 5"),
    ("multikrum", 4, 1, "2f\\+3 = 5"),
    ("bulyan", 5, 1, "4f\\+3 = 7"),
])
def test_a_federation_too_small_for_the_rule_is_refused_before_training(
    name: str, nodes: int, f: int, message: str
) -> None:
    cfg = RunConfig.defaults(strategy=name, num_malicious_clients=f)
    with pytest.raises(ConfigError, match=f"'num-malicious-clients'.*{message}.*only {nodes}"):
        check_federation(cfg, nodes)


def test_multikrum_cannot_select_more_than_the_honest_replies() -> None:
    cfg = RunConfig.defaults(strategy="multikrum", num_malicious_clients=1,
                             multikrum_select=5)
    with pytest.raises(ConfigError, match="'multikrum-select' is 5"):
        check_federation(cfg, 5)


def test_krum_with_too_few_valid_replies_keeps_the_model_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: krum with f=1 needs 5 replies; one of five is broken
    strategy, sink = _strategy(strategy="krum", num_malicious_clients=1)
    replies = [_reply(10 + s, _client_arrays(s), 100) for s in (1, 2, 3, 4)]
    replies.append(BAD_REPLIES["nan"]())

    # Execute
    with caplog.at_level(logging.WARNING):
        aggregated, _ = strategy.aggregate_train(1, replies)

    # Assert
    assert aggregated is None and sink.rows[1]["model-updated"] == 0
    assert any("strategy 'krum' needs at least 2f+3 = 5 valid replies" in r.getMessage()
               for r in caplog.records)


# --- server optimizer state -------------------------------------------------------


@pytest.mark.parametrize(("name", "slots"), [("fedadam", {"m_t", "v_t"}),
                                             ("fedyogi", {"m_t", "v_t"}),
                                             ("fedadagrad", {"m_t", "v_t"}),
                                             ("fedavgm", {"momentum_vector"})])
def test_restored_optimizer_state_continues_exactly(name: str, slots: set[str]) -> None:
    # Prepare: two rounds on one strategy; a second one restored from round 1's state
    first, sink = _strategy(strategy=name)
    round_one = [_reply(10 + s, _client_arrays(s), 100 * s) for s in (1, 2, 3)]
    round_two = [_reply(10 + s, _client_arrays(s + 3), 100 * s, server_round=2)
                 for s in (1, 2, 3)]
    global_one, _ = first.aggregate_train(1, round_one)
    state = sink.states[1]
    _configure(first, global_one)
    expected, _ = first.aggregate_train(2, [_reply(10 + s, _client_arrays(s + 3), 100 * s,
                                                   server_round=2) for s in (1, 2, 3)])
    second, _ = _strategy(strategy=name, offset=1, configure=False)

    # Execute: the resumed strategy's first round is the run's round 2
    second.load_state(state, "latest.pt")
    _configure(second, global_one)
    resumed, _ = second.aggregate_train(1, round_two)

    # Assert
    assert {key.split("/")[0] for key in state} - {"strategy"} == slots
    for key in expected.keys():
        np.testing.assert_array_equal(resumed[key].numpy(), expected[key].numpy(), key)


def test_optimizer_state_of_other_models_is_refused_naming_the_file() -> None:
    # Prepare
    strategy, _ = _strategy(strategy="fedadam")
    state = {"strategy": "fedadam", f"m_t/{G_WEIGHT}": torch.zeros(3)}

    # Execute / Assert
    with pytest.raises(CheckpointError, match="ckpt.pt.*'m_t/generator.net.0.weight'"):
        strategy.load_state(state, "ckpt.pt")


def test_optimizer_state_of_another_strategy_is_ignored_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    strategy, _ = _strategy(strategy="fedyogi")
    with caplog.at_level(logging.WARNING):
        strategy.load_state({"strategy": "fedadam", f"m_t/{G_WEIGHT}": torch.zeros(3)},
                            "ckpt.pt")
    assert find_layer(strategy, BufferSplit).strategy.m_t is None
    assert any("ignoring the server optimizer state of strategy 'fedadam'" in r.getMessage()
               for r in caplog.records)


# --- client evaluation -------------------------------------------------------------


def _evaluate_reply(node_id: int, num_examples: int, accuracy: float) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node_id, message_type="evaluate")
    metrics = MetricRecord({"num-examples": num_examples, "d-accuracy": accuracy})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=request)


@pytest.mark.parametrize("fraction_evaluate", [0.4, 1.0])
def test_clients_evaluate_only_in_the_rounds_that_score_quality(
        fraction_evaluate: float) -> None:
    # Prepare: quality every 3 rounds of 7, so rounds 3, 6 and the last, 7
    strategy, _ = _strategy(eval_every=3, num_server_rounds=7,
                            fraction_evaluate=fraction_evaluate)
    grid = InProcessGrid(client_app.app, num_nodes=5, run_config={})

    # Execute
    asked = {r: len(list(strategy.configure_evaluate(r, _reference(), ConfigRecord(), grid)))
             for r in range(1, 8)}

    # Assert: no round trip to the clients in the other rounds
    per_round = max(int(5 * fraction_evaluate), 1)
    assert asked == {1: 0, 2: 0, 3: per_round, 4: 0, 5: 0, 6: per_round, 7: per_round}


def test_aggregate_evaluate_weights_d_accuracy_and_drops_junk() -> None:
    # Prepare: two honest replies and one with an unexpected key
    strategy, sink = _strategy()
    junk = _evaluate_reply(3, 100, 0.5)
    junk.content["metrics"]["extra"] = 1.0
    replies = [_evaluate_reply(1, 100, 0.9), _evaluate_reply(2, 300, 0.5), junk]

    # Execute
    metrics = strategy.aggregate_evaluate(4, replies)

    # Assert
    assert metrics["d-accuracy"] == pytest.approx(0.6)
    assert sink.evaluate[4]["client-d-accuracy"] == pytest.approx(0.6)


# --- BatchNorm under server optimizers, in whole runs --------------------------------


class RecordingGrid(InProcessGrid):
    """The in-process grid, remembering what each train round sends and receives.

    The replies are copied as they leave the clients (arrays and num-examples).
    """

    def __init__(self, run_config: dict[str, Any], num_nodes: int = 2) -> None:
        super().__init__(client_app.app, num_nodes=num_nodes, run_config=run_config,
                         tamper=self._keep)
        self.sent: dict[int, dict[str, torch.Tensor]] = {}
        self.replies: dict[int, list[tuple[dict[str, torch.Tensor], int]]] = {}

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        """Note the global model of a train round, then run the clients."""
        messages = list(messages)
        for msg in messages:
            if msg.metadata.message_type == "train":
                server_round = int(msg.content["config"]["server-round"])
                self.sent.setdefault(server_round,
                                     msg.content["arrays"].to_torch_state_dict())
        return super().send_and_receive(messages, timeout=timeout)

    def _keep(self, node_id: int, reply: Message) -> Message:
        """Copy a train reply's arrays before the server touches them."""
        if reply.metadata.message_type == "train":
            server_round = max(self.sent)
            self.replies.setdefault(server_round, []).append(
                (reply.content["arrays"].to_torch_state_dict(),
                 int(reply.content["metrics"]["num-examples"])))
        return reply


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
@pytest.mark.slow
def test_server_optimizers_keep_the_model_finite_and_buffers_plainly_averaged(
    name: str, tiny_run_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: 10 rounds of the real ServerApp and ClientApp with Flower's optimizer
    from fedgan_app.server_app import main
    from harness.inprocess import server_context

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = {**tiny_run_config, "strategy": name, "num-server-rounds": 10,
              "local-steps": 1, "batch-size": 8, "eval-every": 100, "sample-every": 100,
              "fraction-evaluate": 0.0}
    grid = RecordingGrid(config)
    buffers = buffer_keys(*_models())

    # Execute
    main(grid, server_context(config))

    # Assert: every global model is finite; after each round its buffers are the
    # plain weighted average of the replies' buffers, its parameters are not
    from fedgan_app.outputs.checkpoint import load_checkpoint

    latest = load_checkpoint(Path(config["output-dir"]) / "test-run" / "checkpoints"
                             / "latest.pt")
    models = {**{r: grid.sent[r + 1] for r in range(1, 10)}, 10: latest.state}
    for server_round, state in models.items():
        replies = grid.replies[server_round]
        total = sum(n for _, n in replies)
        for key, value in state.items():
            assert torch.isfinite(value.double()).all(), (server_round, key)
            if key in buffers:
                mean = sum(s[key].double() * n / total for s, n in replies)
                assert value.dtype == replies[0][0][key].dtype
                torch.testing.assert_close(value.double(), mean.round() if key.endswith(
                    "num_batches_tracked") else mean, rtol=1e-6, atol=1e-7)
    assert not torch.equal(latest.state[G_WEIGHT], grid.sent[10][G_WEIGHT])
    assert set(latest.strategy_state) >= {f"m_t/{G_WEIGHT}", f"v_t/{G_WEIGHT}"}


def test_an_error_the_superlink_writes_for_a_vanished_node_names_that_node() -> None:
    # Prepare: the request as pushed (with its id), and the SuperLink's own error reply
    strategy, sink = _strategy()
    request = Message(content=RecordDict(), dst_node_id=30, message_type="train")
    request.metadata.__dict__["_message_id"] = "request-to-30"
    find_layer(strategy, ReplyScreen)._sent_messages = [request]
    failed = Message(Error(code=1, reason="node unavailable"), reply_to=request)
    failed.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID

    # Execute
    strategy.aggregate_train(1, [_reply(10, _client_arrays(1), 100), failed])

    # Assert: the row and the count name node 30, not the SuperLink
    assert sink.clients[1][1]["node-id"] == 30
    assert sink.rows[1]["replies-failed"] == 1


# --- honest weights: a claimed num-examples cannot buy the average ------------------

# Partition p (node 101 + p of the in-process grid) holds 100 + 10 p images of class p.
COUNTS = [[100 + 10 * p if c == p else 0 for c in range(10)] for p in range(5)]


def _checked_strategy(partition_ids: list[int] | None = None,
                      **overrides: Any) -> tuple[RunRounds, CollectingSink]:
    """The stack with weight-check partition-size (the default), after round 1's query."""
    cfg = RunConfig.defaults(**{"conditional": False, **overrides})  # GAN is unconditional
    sink = CollectingSink()
    strategy = build_strategy(cfg, _reference(), buffer_keys(*_models()), sink, 5,
                              num_classes=10, partitions=lambda n: COUNTS[:n])
    grid = InProcessGrid(client_app.app, num_nodes=5, run_config={},
                         partition_ids=partition_ids)
    list(strategy.configure_train(1, _reference(), ConfigRecord(), grid))
    return strategy, sink


def _node_reply(node: int, arrays: ArrayRecord, partition: int | None = None,
                **changes: Any) -> Message:
    """Node `node`'s honest reply for its partition, with `changes` to its metadata."""
    partition = node - 101 if partition is None else partition
    counts = COUNTS[partition]
    meta = honest_meta(**{"partition_id": partition, "num_examples": sum(counts),
                          "label_histogram": counts, **changes})
    return _reply(node, arrays, meta.num_examples, encode_metadata(meta))


def test_a_claim_beyond_its_partition_is_dropped_and_moves_nothing() -> None:
    # Prepare: four honest nodes; node 105 claims 10**15 examples (metric and metadata
    # agree) for an update far from everyone's
    honest = [_node_reply(101 + p, _client_arrays(p + 1)) for p in range(4)]
    boosted = _scaled(_client_arrays(9), _reference(), 50.0)
    claim = honest_meta(partition_id=4, num_examples=10**15)
    attacker = _reply(105, boosted, 10**15, encode_metadata(claim))
    strategy, sink = _checked_strategy()
    alone, _ = _checked_strategy()

    # Execute
    aggregated, _ = strategy.aggregate_train(1, [*honest, attacker])
    expected, _ = alone.aggregate_train(1, [_node_reply(101 + p, _client_arrays(p + 1))
                                            for p in range(4)])

    # Assert: the model is exactly the honest nodes' average
    for key in expected.keys():
        np.testing.assert_array_equal(aggregated[key].numpy(), expected[key].numpy(), key)
    assert sink.rows[1]["dropped-weight"] == 1
    assert sink.clients[1][4]["reason"] == ("weight: claims 1000000000000000 examples, "
                                            "partition 4 holds 140")
    assert [r["weight"] for r in sink.clients[1][:4]] == pytest.approx(
        [n / 460 for n in (100, 110, 120, 130)])


HOSTILE_CLAIMS = {
    "another node's partition": (lambda a: _node_reply(101, a, partition=2),
                                 "partition: the reply is for partition 2, node 101 holds "
                                 "partition 0"),
    "its size with other labels": (lambda a: _node_reply(101, a, label_histogram=[50] * 2
                                                         + [0] * 8),
                                   "weight: the label counts differ from partition 0's"),
    "a replayed round": (lambda a: _node_reply(101, a, server_round=7),
                         "round: the reply is for round 7, this is round 1"),
    "a node that never said its partition": (
        lambda a: _reply(999, a, 100), "partition: node 999 has no partition of its own "
        "(it did not answer the partition query)"),
}


@pytest.mark.parametrize("name", list(HOSTILE_CLAIMS))
def test_a_claim_that_does_not_fit_its_node_is_dropped(name: str) -> None:
    # Prepare
    build, reason = HOSTILE_CLAIMS[name]
    strategy, sink = _checked_strategy()
    replies = [build(_client_arrays(1)), _node_reply(102, _client_arrays(2))]

    # Execute
    aggregated, _ = strategy.aggregate_train(1, replies)

    # Assert: dropped with its reason; the honest reply alone makes the model
    assert aggregated is not None
    assert sink.clients[1][0]["status"] == "dropped"
    assert sink.clients[1][0]["reason"] == reason
    assert sink.rows[1]["replies-accepted"] == 1


def test_two_nodes_claiming_one_partition_train_it_once() -> None:
    # Prepare: nodes 101 and 102 both hold partition 0 (the query keeps 101 first)
    strategy, sink = _checked_strategy(partition_ids=[0, 0, 2, 3, 4])
    replies = [_node_reply(101, _client_arrays(1)), _node_reply(102, _client_arrays(2), 0)]

    # Execute
    strategy.aggregate_train(1, replies)

    # Assert
    assert [r["status"] for r in sink.clients[1]] == ["accepted", "dropped"]
    assert sink.clients[1][1]["reason"] == ("partition: partition 0 is already trained by "
                                            "node 101 this round")


def test_cap_bounds_the_share_of_a_huge_claim() -> None:
    # Prepare: weight-check cap (nodes with data of their own): four claims of 100, one
    # of 10**15 whose metadata is consistent
    strategy, sink = _strategy(weight_check="cap", weight_cap_ratio=3.0, max_weight_share=0.5)
    arrays = [_client_arrays(seed) for seed in (1, 2, 3, 4, 5)]
    claims = [100, 100, 100, 100, 10**15]
    replies = [_reply(10 + i, a, n) for i, (a, n) in enumerate(zip(arrays, claims,
                                                                   strict=True))]

    # Execute
    aggregated, _ = strategy.aggregate_train(1, replies)

    # Assert: the huge claim counts as 3 x the median claim, no more
    shares = [1 / 7] * 4 + [3 / 7]
    assert [r["weight"] for r in sink.clients[1]] == pytest.approx(shares)
    assert sink.rows[1]["weights-capped"] == 1
    np.testing.assert_allclose(aggregated[G_WEIGHT].numpy(),
                               _weighted_mean(arrays, [1, 1, 1, 1, 3], G_WEIGHT), atol=1e-6)


def test_max_weight_share_caps_every_reply() -> None:
    # Prepare: no median clip, shares capped at 0.3; one claim is 9x the others
    strategy, sink = _strategy(weight_check="cap", weight_cap_ratio=0.0, max_weight_share=0.3)
    arrays = [_client_arrays(seed) for seed in (1, 2, 3, 4)]
    replies = [_reply(10 + i, a, n) for i, (a, n) in enumerate(zip(arrays, [100, 100, 100, 900],
                                                                   strict=True))]

    # Execute
    strategy.aggregate_train(1, replies)

    # Assert: 0.3 for the big claim, the rest shared pro rata
    assert [r["weight"] for r in sink.clients[1]] == pytest.approx([7 / 30] * 3 + [0.3])


def test_weight_cap_ratio_between_zero_and_one_is_refused() -> None:
    with pytest.raises(ConfigError, match="weight-cap-ratio"):
        RunConfig.defaults(weight_cap_ratio=0.5)


# --- a reply's failure stays its own -------------------------------------------------


def _lie_about_shape(array: Any) -> None:
    """Rewrite an Array's bytes: a .npy header declaring 10**10 floats, 32 bytes of data."""
    header = array.data[:array.data.index(b"}") + 1].decode("latin-1")
    fake = header.replace(str(tuple(array.shape)), "(10000000000,)")
    body = fake.encode("latin-1")
    body = body[:6] + b"\x01\x00" + len(body[10:]).to_bytes(2, "little") + body[10:]
    array.data = body + b"\n" + b"\x00" * 32


def test_arrays_whose_bytes_lie_about_their_shape_are_dropped_unread() -> None:
    # Prepare: the Array's metadata says the model's shape; its bytes say 10**10 floats
    strategy, sink = _strategy()
    hostile = _reply(11, _client_arrays(2), 100)
    _lie_about_shape(hostile.content["arrays"][G_WEIGHT])
    tracemalloc.start()

    # Execute
    try:
        aggregated, _ = strategy.aggregate_train(1, [_reply(10, _client_arrays(1), 100),
                                                     hostile])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    # Assert
    assert aggregated is not None and sink.rows[1]["replies-accepted"] == 1
    assert sink.clients[1][1]["reason"].startswith(f"data: '{G_WEIGHT}' ")
    assert peak < 200_000_000


class _ExplodingRecord(ArrayRecord):
    """Arrays whose key listing raises (any exception while checking one reply)."""

    def keys(self):  # noqa: ANN201
        raise RuntimeError("boom")

    def __iter__(self):  # noqa: ANN204
        raise RuntimeError("boom")


def test_an_exception_while_checking_one_reply_drops_only_that_reply() -> None:
    # Prepare
    strategy, sink = _strategy()
    broken = _reply(11, _client_arrays(2), 100)
    broken.content.array_records["arrays"] = _ExplodingRecord()

    # Execute
    aggregated, _ = strategy.aggregate_train(1, [_reply(10, _client_arrays(1), 100), broken])

    # Assert
    assert aggregated is not None
    assert sink.clients[1][1]["reason"] == "error: RuntimeError while checking the reply"
    assert sink.rows[1]["dropped-error"] == 1 and sink.rows[1]["replies-accepted"] == 1


def test_an_error_reply_reason_is_cut_and_made_printable() -> None:
    # Prepare: a 1 MB error reason with terminal escape codes
    strategy, sink = _strategy()
    request = Message(content=RecordDict(), dst_node_id=30, message_type="train")
    failed = Message(Error(code=1, reason="\x1b[2J" + "x" * 1_000_000), reply_to=request)

    # Execute
    strategy.aggregate_train(1, [_reply(10, _client_arrays(1), 100), failed])

    # Assert
    reason = sink.clients[1][1]["reason"]
    assert len(reason) < 220 and "\x1b" not in reason and reason.startswith("error: ?[2J")
