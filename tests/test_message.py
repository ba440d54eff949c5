"""The client-server message: RoundConfig, metric names, query records, model packing."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from fedgan_app.gan.models import GANConfig, build_gan
from fedgan_app.protocol.message import (
    D_PREFIX,
    G_PREFIX,
    NUM_PARTITIONS,
    PARTITION_ID,
    QUERY_RECORD_KEY,
    TRAIN_METRIC_KEYS,
    MessageError,
    RoundConfig,
    TrainMetrics,
    buffer_keys,
    mean,
    pack_gan,
    query_reply,
    read_query_reply,
    server_round_of,
    unpack_gan,
)
from tests.conftest import REPO_ROOT

ROUND = RoundConfig(server_round=3, lr_generator=1e-3, lr_discriminator=2e-3, local_steps=7,
                    batch_size=16, seed=42)


# --- RoundConfig ------------------------------------------------------------------


def test_round_config_round_trips_through_its_record() -> None:
    # Prepare
    with_mu = dataclasses.replace(ROUND, proximal_mu=0.25)

    # Execute
    record = ROUND.to_record()
    read, read_mu = RoundConfig.from_record(record), RoundConfig.from_record(with_mu.to_record())

    # Assert: kebab-case keys; proximal-mu only when set
    assert dict(record) == {"server-round": 3, "lr-generator": 1e-3, "lr-discriminator": 2e-3,
                            "local-steps": 7, "batch-size": 16, "seed": 42}
    assert read == ROUND and read.proximal_mu is None
    assert read_mu == with_mu and read_mu.proximal_mu == 0.25


def test_round_config_takes_an_integer_rate_and_flower_s_extra_keys() -> None:
    # Prepare: a record as Flower's FedProx leaves it (server-round set again, mu added)
    record = ConfigRecord({**ROUND.to_record(), "lr-generator": 1, "proximal-mu": 0.5})

    # Execute
    config = RoundConfig.from_record(record)

    # Assert
    assert config.lr_generator == 1.0 and isinstance(config.lr_generator, float)
    assert config.proximal_mu == 0.5


@pytest.mark.parametrize(("key", "value", "message"), [
    ("lr-generator", "fast", "'lr-generator' must be a finite number, got str"),
    ("local-steps", 2.5, "'local-steps' must be an integer, got float"),
    ("seed", True, "'seed' must be an integer, got bool"),
    ("lr-discriminator", float("nan"), "'lr-discriminator' must be a finite number"),
    ("proximal-mu", "0.1", "'proximal-mu' must be a finite number, got str"),
])
def test_round_config_names_the_key_of_a_wrong_type(key: str, value: object,
                                                    message: str) -> None:
    # Prepare
    record = ConfigRecord({**ROUND.to_record(), key: value})

    # Execute / Assert
    with pytest.raises(MessageError, match=message):
        RoundConfig.from_record(record)


def test_round_config_names_a_missing_key_and_refuses_zero_steps() -> None:
    # Prepare
    missing = {k: v for k, v in ROUND.to_record().items() if k != "batch-size"}

    # Execute / Assert
    with pytest.raises(MessageError, match="no 'batch-size'"):
        RoundConfig.from_record(missing)
    with pytest.raises(MessageError, match="local-steps"):
        RoundConfig.from_record({**ROUND.to_record(), "local-steps": 0})


def test_an_evaluate_request_s_round_is_read_and_checked() -> None:
    assert server_round_of(ConfigRecord({"server-round": 4})) == 4
    with pytest.raises(MessageError, match="no 'server-round'"):
        server_round_of(ConfigRecord({}))
    with pytest.raises(MessageError, match="'server-round' must be an integer"):
        server_round_of(ConfigRecord({"server-round": "4"}))


# --- metrics and the query --------------------------------------------------------


def test_train_metrics_are_the_names_the_server_checks() -> None:
    # Execute
    record = TrainMetrics(num_examples=10, loss_d=1.0, loss_g=2.0, d_x=0.5, d_gz=0.4,
                          wall_time_s=3.0, images_per_s=50.0).to_record()

    # Assert
    assert list(record) == ["num-examples", "loss-d", "loss-g", "d-x", "d-gz",
                            "wall-time-s", "images-per-s"]
    assert set(record) == TRAIN_METRIC_KEYS
    assert mean([1.0, 2.0]) == 1.5 and mean([]) != mean([])  # NaN for an empty history


def test_a_query_reply_reads_back_and_junk_is_refused() -> None:
    # Prepare
    request = Message(content=RecordDict(), dst_node_id=7, message_type="query")
    junk = Message(content=RecordDict({QUERY_RECORD_KEY: ConfigRecord(
        {PARTITION_ID: 1, NUM_PARTITIONS: 0})}), reply_to=request)

    # Execute
    answer, _ = read_query_reply(query_reply(request, 2, 5))
    refused, reason = read_query_reply(junk)

    # Assert
    assert answer == (2, 5)
    assert refused is None and reason == "num-partitions must be >= 1, got 0"


# --- model packing ----------------------------------------------------------------


def test_pack_unpack_round_trip_is_exact_with_batchnorm_buffers() -> None:
    # Prepare: run a forward pass in train mode so BN running stats move
    generator, discriminator = build_gan(GANConfig(), 1)
    discriminator(generator(torch.randn(8, 100)))
    target_g, target_d = build_gan(GANConfig(), 2)

    # Execute
    record = pack_gan(generator, discriminator)
    unpack_gan(record, target_g, target_d)

    # Assert
    keys = list(record.keys())
    assert any(k.startswith(G_PREFIX) and "running_mean" in k for k in keys)
    assert any(k.startswith(D_PREFIX) and "num_batches_tracked" in k for k in keys)
    for src, dst in ((generator, target_g), (discriminator, target_d)):
        for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
            assert a.dtype == b.dtype


def test_unpack_rejects_foreign_keys() -> None:
    generator, discriminator = build_gan(GANConfig(), 1)
    record = pack_gan(generator, discriminator)
    record["other.weight"] = record[G_PREFIX + "net.0.weight"]
    with pytest.raises(KeyError, match="other.weight"):
        unpack_gan(record, generator, discriminator)


def test_buffer_keys_are_the_packed_buffers_and_no_weight() -> None:
    # Prepare
    generator, discriminator = build_gan(GANConfig(), 0)
    packed = set(pack_gan(generator, discriminator).keys())

    # Execute
    buffers = buffer_keys(generator, discriminator)

    # Assert
    assert buffers < packed
    assert f"{G_PREFIX}net.1.running_var" in buffers
    assert f"{D_PREFIX}net.3.num_batches_tracked" in buffers
    assert not any(k.endswith(".weight") for k in buffers)


# --- the GAN package stays free of Flower -------------------------------------------


def _loads_flower(modules: str) -> bool:
    """Whether importing `modules` in a fresh interpreter puts flwr in sys.modules."""
    code = (f"import sys, {modules}; "
            "print(any(m == 'flwr' or m.startswith('flwr.') for m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO_ROOT, check=True, timeout=120)
    return result.stdout.strip() == "True"


@pytest.mark.slow  # a Python process of its own
def test_the_gan_package_imports_no_flower() -> None:
    # Execute: the GAN's modules alone, and the protocol as a control
    gan = _loads_flower("fedgan_app.gan.models, fedgan_app.gan.training, "
                        "fedgan_app.gan.diffaugment")
    protocol = _loads_flower("fedgan_app.protocol.message")

    # Assert
    assert not gan
    assert protocol
