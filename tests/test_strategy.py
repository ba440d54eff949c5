"""FedGAN aggregation with hand-built replies: weighting, validation, robustness."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.error import Error

from fedgan_app.config import RunConfig
from fedgan_app.metadata import METADATA_KEY, encode_metadata
from fedgan_app.models import GANConfig, build_gan, pack_gan
from fedgan_app.strategy import FedGAN
from tests.test_metadata import _OsSystem, make_meta


class ListSink:
    """Collects the per-client rows the strategy hands over."""

    def __init__(self) -> None:
        self.rows: dict[int, list[dict]] = {}

    def log_clients(self, server_round: int, rows: list[dict]) -> None:
        """Keep the rows of a round."""
        self.rows[server_round] = rows


def _reference() -> ArrayRecord:
    generator, discriminator = build_gan(GANConfig(), seed=0)
    return pack_gan(generator, discriminator)


def _client_arrays(seed: int) -> ArrayRecord:
    # A differently initialised pair stands in for a trained client model.
    generator, discriminator = build_gan(GANConfig(), seed=seed)
    return pack_gan(generator, discriminator)


def _reply(node_id: int, arrays: ArrayRecord, num_examples: int,
           metadata: ConfigRecord | None = None, **metric_changes) -> Message:
    """A train reply as a client would send it."""
    request = Message(content=RecordDict(), dst_node_id=node_id, message_type="train")
    metrics = {"num-examples": num_examples, "loss-d": 1.0, "loss-g": 1.0, "d-x": 0.5,
               "d-gz": 0.5, "wall-time-s": 1.0, "images-per-s": 100.0}
    metrics.update(metric_changes)
    if metadata is None:
        metadata = encode_metadata(make_meta(partition_id=node_id, num_examples=num_examples))
    # A copy: Flower's median/trimmed-mean pop arrays out of the replies.
    arrays = ArrayRecord(arrays.to_torch_state_dict())
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics),
                          "metadata": metadata})
    return Message(content=content, reply_to=request)


def _strategy(**overrides) -> tuple[FedGAN, ListSink]:
    sink = ListSink()
    return FedGAN(RunConfig.defaults(**overrides), reference=_reference(), sink=sink), sink


def test_weighted_average_equals_hand_computation() -> None:
    # Prepare: 3 clients with 100, 300, 600 examples
    strategy, sink = _strategy()
    sizes = [100, 300, 600]
    arrays = [_client_arrays(seed) for seed in (1, 2, 3)]
    replies = [_reply(10 + i, a, n) for i, (a, n) in enumerate(zip(arrays, sizes, strict=True))]

    # Execute
    aggregated, metrics = strategy.aggregate_train(1, replies)

    # Assert: p_j = |R_j| / sum |R_k| on every array, BN buffers included
    weights = np.array(sizes) / sum(sizes)
    for key in aggregated.keys():
        expected = sum(w * a[key].numpy() for w, a in zip(weights, arrays, strict=True))
        np.testing.assert_allclose(aggregated[key].numpy(), expected, rtol=1e-6, atol=1e-7)
    assert metrics["loss-d"] == pytest.approx(1.0)
    assert strategy.round_metrics[1]["num-examples-total"] == 1000
    assert strategy.round_metrics[1]["replies-accepted"] == 3
    rows = sink.rows[1]
    assert [row["partition-id"] for row in rows] == [10, 11, 12]
    assert [row["status"] for row in rows] == ["accepted"] * 3
    assert [row["weight"] for row in rows] == pytest.approx([0.1, 0.3, 0.6])
    assert all(row["reason"] == "" for row in rows)
    assert rows[0]["label-histogram"] == ";".join(["80"] * 10)


def _nan_arrays() -> ArrayRecord:
    state = _client_arrays(4).to_torch_state_dict()
    state["generator.net.0.weight"][0, 0, 0, 0] = float("nan")
    return ArrayRecord(state)


def _wrong_shape_arrays() -> ArrayRecord:
    state = _client_arrays(4).to_torch_state_dict()
    state["discriminator.net.0.weight"] = torch.zeros(3, 3)
    return ArrayRecord(state)


def _missing_key_arrays() -> ArrayRecord:
    state = _client_arrays(4).to_torch_state_dict()
    del state["generator.net.1.running_mean"]
    return ArrayRecord(state)


def _extra_key_arrays() -> ArrayRecord:
    state = _client_arrays(4).to_torch_state_dict()
    state["generator.backdoor"] = torch.ones(2)
    return ArrayRecord(state)


def _wrong_dtype_arrays() -> ArrayRecord:
    state = _client_arrays(4).to_torch_state_dict()
    state["generator.net.0.weight"] = state["generator.net.0.weight"].double()
    return ArrayRecord(state)


BAD_REPLIES = {
    "nan": lambda: _reply(20, _nan_arrays(), 500),
    "wrong shape": lambda: _reply(20, _wrong_shape_arrays(), 500),
    "missing key": lambda: _reply(20, _missing_key_arrays(), 500),
    "extra key": lambda: _reply(20, _extra_key_arrays(), 500),
    "wrong dtype": lambda: _reply(20, _wrong_dtype_arrays(), 500),
    "inf metric": lambda: _reply(20, _client_arrays(4), 500, **{"loss-d": float("inf")}),
    "zero examples": lambda: _reply(20, _client_arrays(4), 0),
    "undecodable metadata": lambda: _reply(
        20, _client_arrays(4), 500, ConfigRecord({METADATA_KEY: b"\x80\x05garbage"})),
    "metadata disagrees on size": lambda: _reply(
        20, _client_arrays(4), 500, encode_metadata(make_meta(num_examples=7))),
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
    for key in ("generator.net.0.weight", "discriminator.net.0.weight"):
        expected = 0.25 * good[0][key].numpy() + 0.75 * good[1][key].numpy()
        np.testing.assert_allclose(aggregated[key].numpy(), expected, rtol=1e-6)
    assert all(np.isfinite(a.numpy()).all() for a in aggregated.values())
    assert strategy.round_metrics[1]["replies-dropped"] == 1
    assert strategy.round_metrics[1]["replies-accepted"] == 2
    # clients.csv: every reply has a row; the dropped one says why, with weight 0
    rows = sink.rows[1]
    assert [row["status"] for row in rows] == ["accepted", "accepted", "dropped"]
    assert [row["weight"] for row in rows] == pytest.approx([0.25, 0.75, 0.0])
    assert rows[2]["node-id"] == 20 and rows[2]["reason"]


def test_hostile_metadata_reply_is_dropped_and_nothing_runs(tmp_path: Path) -> None:
    # Prepare
    marker = tmp_path / "pwned"
    hostile = ConfigRecord({METADATA_KEY: pickle.dumps(_OsSystem(marker))})
    strategy, _ = _strategy()
    replies = [_reply(10, _client_arrays(1), 100), _reply(11, _client_arrays(2), 100, hostile)]

    # Execute
    aggregated, _ = strategy.aggregate_train(3, replies)

    # Assert
    assert not marker.exists()
    assert aggregated is not None
    assert strategy.round_metrics[3]["dropped-metadata"] == 1


def test_too_few_valid_replies_keeps_previous_model() -> None:
    strategy, sink = _strategy(min_train_replies=2)
    aggregated, _ = strategy.aggregate_train(1, [_reply(10, _client_arrays(1), 100),
                                                  _reply(11, _nan_arrays(), 100)])
    assert aggregated is None
    assert strategy.round_metrics[1]["replies-accepted"] == 1
    # Nothing was aggregated: no client has a weight
    assert [(r["status"], r["weight"]) for r in sink.rows[1]] == [
        ("accepted", 0.0), ("dropped", 0.0)]


def test_a_failed_reply_gets_a_row_with_only_its_node_id() -> None:
    # Prepare
    strategy, sink = _strategy()
    request = Message(content=RecordDict(), dst_node_id=30, message_type="train")
    failed = Message(Error(code=1, reason="boom"), reply_to=request)

    # Execute
    strategy.aggregate_train(1, [_reply(10, _client_arrays(1), 100), failed])

    # Assert
    row = sink.rows[1][1]
    assert row == {"node-id": 30, "status": "failed", "reason": "error: boom",
                   "weight": 0.0}


def _scaled(arrays: ArrayRecord, base: ArrayRecord, factor: float) -> ArrayRecord:
    # base + factor * (arrays - base) for float arrays: a boosted update.
    out = {}
    for key, value in arrays.to_torch_state_dict().items():
        ref = base[key].numpy()
        out[key] = value if not value.is_floating_point() else torch.from_numpy(
            (ref + factor * (value.numpy() - ref)).astype(ref.dtype))
    return ArrayRecord(out)


def test_update_norm_screen_drops_a_boosted_update() -> None:
    # Prepare: the strategy remembers the global model it sent
    strategy, sink = _strategy()
    base = _reference()
    strategy._global = {k: v.numpy() for k, v in base.items()}
    honest = [_scaled(_client_arrays(s), base, 0.01) for s in (1, 2, 3)]
    boosted = _scaled(_client_arrays(4), base, 10.0)
    replies = [_reply(10 + i, a, 100) for i, a in enumerate(honest)]
    replies.append(_reply(20, boosted, 100))

    # Execute
    aggregated, _ = strategy.aggregate_train(1, replies)

    # Assert
    assert strategy.round_metrics[1]["dropped-norm"] == 1
    dropped = [row for row in sink.rows[1] if row["status"] == "dropped"]
    assert len(dropped) == 1 and dropped[0]["node-id"] == 20
    assert dropped[0]["reason"].startswith("norm: update norm ")
    assert dropped[0]["partition-id"] == 20 and dropped[0]["weight"] == 0.0
    expected = np.mean([a["generator.net.0.weight"].numpy() for a in honest], axis=0)
    np.testing.assert_allclose(aggregated["generator.net.0.weight"].numpy(), expected,
                               rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("aggregation", ["median", "trimmed-mean"])
def test_robust_aggregation_resists_one_sign_flipped_client(aggregation: str) -> None:
    # Prepare: 4 honest clients near the global model, 1 flipped and boosted
    strategy, _ = _strategy(aggregation=aggregation, trim_fraction=0.2,
                            max_update_norm_ratio=0.0)
    base = _reference()
    honest = [_scaled(_client_arrays(s), base, 0.01) for s in (1, 2, 3, 4)]
    attacker = _scaled(_client_arrays(5), base, -5.0)
    replies = [_reply(10 + i, a, 100) for i, a in enumerate(honest + [attacker])]

    # Execute
    aggregated, _ = strategy.aggregate_train(1, replies)

    # Assert: closer to the honest mean than plain averaging would be
    key = "generator.net.0.weight"
    honest_mean = np.mean([a[key].numpy() for a in honest], axis=0)
    plain_mean = np.mean([a[key].numpy() for a in honest + [attacker]], axis=0)
    robust_err = np.linalg.norm(aggregated[key].numpy() - honest_mean)
    plain_err = np.linalg.norm(plain_mean - honest_mean)
    assert robust_err < 0.2 * plain_err


def test_configure_train_sends_schedule_and_settings() -> None:
    # Prepare
    strategy, _ = _strategy(lr_decay_every=1, lr_decay_factor=0.5, local_steps=7)

    class TwoNodes:
        def get_node_ids(self):
            return [1, 2]

    # Execute
    messages = list(strategy.configure_train(3, _reference(), ConfigRecord(), TwoNodes()))

    # Assert
    config = messages[0].content["config"]
    assert config["server-round"] == 3
    assert config["lr-generator"] == pytest.approx(2e-4 / 4)
    assert config["local-steps"] == 7 and config["seed"] == 42
    assert {m.metadata.dst_node_id for m in messages} == {1, 2}


def _evaluate_reply(node_id: int, num_examples: int, accuracy: float) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node_id, message_type="evaluate")
    metrics = MetricRecord({"num-examples": num_examples, "d-accuracy": accuracy})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=request)


def test_aggregate_evaluate_weights_d_accuracy_and_drops_junk() -> None:
    # Prepare: two honest replies and one with an unexpected key
    strategy, _ = _strategy()
    junk = _evaluate_reply(3, 100, 0.5)
    junk.content["metrics"]["extra"] = 1.0
    replies = [_evaluate_reply(1, 100, 0.9), _evaluate_reply(2, 300, 0.5), junk]

    # Execute
    metrics = strategy.aggregate_evaluate(4, replies)

    # Assert
    assert metrics["d-accuracy"] == pytest.approx(0.6)
    assert strategy.round_metrics[4]["client-d-accuracy"] == pytest.approx(0.6)
