"""Class-aware aggregation: each class's rows weighted by the clients' counts of that class."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedgan_app.config import RunConfig
from fedgan_app.federation import client_app
from fedgan_app.federation.classes import class_rows, per_class_average
from fedgan_app.federation.strategy import build_strategy
from fedgan_app.gan.models import build_gan, gan_config
from fedgan_app.outputs.runfolder import RunFolder
from fedgan_app.protocol.message import buffer_keys, pack_gan
from fedgan_app.protocol.metadata import encode_metadata
from fedgan_app.server_app import main as server_main
from fedgan_app.settings import ConfigError
from harness.attacks import honest_meta
from harness.inprocess import InProcessGrid, server_context
from tests.test_strategy import CollectingSink

CLASSES = 10
# Partition 0 holds classes 0 and 1, partition 1 classes 1 and 2: class 0 and
# class 2 each belong to one client, class 1 to both (unevenly), the rest to none.
COUNTS = [[50, 10] + [0] * 8, [0, 30, 40] + [0] * 7]
G_INPUT = "generator.net.0.weight"
D_EMBED = "discriminator.embed.weight"
G_OTHER = "generator.net.3.weight"
# G's conditional BatchNorm layers (g-conditioning 'batchnorm'): a (gain, bias) row per class
G_NORMS = ("generator.net.1.embed.weight", "generator.net.4.embed.weight")


def _models(seed: int = 0, g_conditioning: str = "input"
            ) -> tuple[torch.nn.Module, torch.nn.Module]:
    cfg = RunConfig.defaults(g_conditioning=g_conditioning)
    return build_gan(gan_config(cfg, (1, 28, 28), CLASSES), seed=seed)


def _stack(class_aware: bool, g_conditioning: str = "input") -> Any:
    """The strategy of a conditional run with weight-check partition-size, after round 1's query."""
    cfg = RunConfig.defaults(class_aware=class_aware, g_conditioning=g_conditioning)
    generator, discriminator = _models(g_conditioning=g_conditioning)
    strategy = build_strategy(cfg, pack_gan(generator, discriminator),
                              buffer_keys(generator, discriminator), CollectingSink(), 2,
                              num_classes=CLASSES, partitions=lambda n: COUNTS[:n])
    grid = InProcessGrid(client_app.app, num_nodes=2, run_config={})
    sent = list(strategy.configure_train(1, pack_gan(generator, discriminator),
                                         ConfigRecord(), grid))
    return strategy, [m.metadata.dst_node_id for m in sent]


def _client_arrays(seed: int, g_conditioning: str = "input") -> ArrayRecord:
    """The reference model with every parameter moved by its own random update."""
    models = _models(g_conditioning=g_conditioning)
    state = pack_gan(*models).to_torch_state_dict()
    buffers = buffer_keys(*models)
    rng = torch.Generator().manual_seed(seed)
    for key, value in state.items():
        if key not in buffers:
            state[key] = value + torch.randn(value.shape, generator=rng)
    return ArrayRecord(state)


def _reply(node: int, partition: int, arrays: ArrayRecord) -> Message:
    """Node `node`'s honest reply for its partition."""
    counts = COUNTS[partition]
    meta = honest_meta(partition_id=partition, num_examples=sum(counts),
                       label_histogram=counts)
    request = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    metrics = {"num-examples": sum(counts), "loss-d": 1.0, "loss-g": 1.0, "d-x": 0.5,
               "d-gz": 0.5, "wall-time-s": 1.0, "images-per-s": 100.0}
    content = RecordDict({"arrays": ArrayRecord(arrays.to_torch_state_dict()),
                          "metrics": MetricRecord(metrics),
                          "metadata": encode_metadata(meta)})
    return Message(content=content, reply_to=request)


def _aggregate(class_aware: bool, updates: list[ArrayRecord],
               g_conditioning: str = "input") -> ArrayRecord:
    strategy, nodes = _stack(class_aware, g_conditioning)
    # The in-process grid's node 101 + i holds partition i, which update i trained.
    replies = [_reply(node, node - 101, updates[node - 101]) for node in nodes]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    return arrays


@pytest.mark.parametrize("g_conditioning", ["input", "batchnorm"])
def test_a_class_held_by_one_client_moves_by_that_clients_full_update(
        g_conditioning: str) -> None:
    # Prepare: two clients' updates; the class rows of G's input are the last 10
    # of its first axis, D's embedding (and G's conditional BatchNorm
    # embeddings) have one row per class
    updates = [_client_arrays(1, g_conditioning), _client_arrays(2, g_conditioning)]
    sizes = np.array([sum(c) for c in COUNTS], dtype=np.float64)
    first = G_INPUT
    norms = G_NORMS if g_conditioning == "batchnorm" else ()

    # Execute
    aware = _aggregate(True, updates, g_conditioning)
    plain = _aggregate(False, updates, g_conditioning)

    # Assert: class 0 is client 0's own rows, class 2 client 1's; class 1 is
    # weighted 10:30; a class no one holds, and every other parameter, is
    # FedAvg's data-size average
    latent = aware[first].numpy().shape[0] - CLASSES
    assert all(key in aware for key in norms)
    for key, offset in ((first, latent), (D_EMBED, 0), *((key, 0) for key in norms)):
        mine = [u[key].numpy() for u in updates]
        got = aware[key].numpy()
        np.testing.assert_allclose(got[offset + 0], mine[0][offset + 0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[offset + 2], mine[1][offset + 2], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[offset + 1], 0.25 * mine[0][offset + 1]
                                   + 0.75 * mine[1][offset + 1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[offset + 5], plain[key].numpy()[offset + 5])
        assert not np.allclose(plain[key].numpy()[offset + 0], mine[0][offset + 0])
    np.testing.assert_allclose(aware[first].numpy()[:latent], plain[first].numpy()[:latent])
    fedavg = sum(w * u[G_OTHER].numpy() for w, u in zip(sizes / sizes.sum(), updates,
                                                          strict=True))
    np.testing.assert_allclose(aware[G_OTHER].numpy(), fedavg, rtol=1e-5, atol=1e-6)


def test_per_class_average_keeps_the_aggregate_of_a_class_nobody_holds() -> None:
    rows = [np.array([[1.0, 1.0], [2.0, 2.0]]), np.array([[3.0, 3.0], [6.0, 6.0]])]
    counts = [[1, 0], [3, 0]]
    mixed = per_class_average(rows, counts, np.array([[9.0, 9.0], [7.0, 7.0]]))
    np.testing.assert_allclose(mixed, [[2.5, 2.5], [7.0, 7.0]])


def test_class_rows_of_an_unconditional_gan_are_refused() -> None:
    cfg = RunConfig.defaults(conditional=False)
    generator, discriminator = build_gan(gan_config(cfg, (1, 28, 28), CLASSES), seed=0)
    with pytest.raises(ValueError, match="needs a conditional GAN"):
        class_rows(pack_gan(generator, discriminator), CLASSES, cfg.latent_dim,
                   buffer_keys(generator, discriminator))


BLOCKERS = [
    ({"conditional": False}, "unconditional GAN has no class rows"),
    ({"strategy": "median"}, "'median' is not one it works with .fedavg or fedprox.: a robust"),
    ({"strategy": "fedadam"}, "server optimizer's state"),
    ({"weight_check": "cap"}, "checked only by weight-check 'partition-size'"),
]


@pytest.mark.parametrize("overrides,reason", BLOCKERS)
def test_on_refuses_combinations_that_make_no_sense(overrides: dict, reason: str) -> None:
    with pytest.raises(ConfigError, match="'class-aware' is 'on' but .*" + reason):
        RunConfig.defaults(class_aware="on", **overrides)


@pytest.mark.parametrize("overrides,reason", [*BLOCKERS, ({"dp": "server-fixed"}, "under dp")])
def test_auto_turns_itself_off_where_it_makes_no_sense(overrides: dict, reason: str) -> None:
    cfg = RunConfig.defaults(**overrides)  # class-aware 'auto' is the default

    assert cfg.class_aware == "auto"
    assert not cfg.aggregates_by_class
    assert re.search(reason, cfg.class_aware_blocker() or "")


def test_auto_is_on_for_the_default_run_and_off_is_off() -> None:
    assert RunConfig.defaults().aggregates_by_class
    assert RunConfig.defaults(strategy="fedprox").aggregates_by_class
    assert not RunConfig.defaults(class_aware="off").aggregates_by_class


@pytest.mark.parametrize("value,mode", [(True, "on"), (False, "off")])
def test_a_toml_true_or_false_reads_as_on_or_off(value: bool, mode: str) -> None:
    assert RunConfig.from_run_config({"class-aware": value}).class_aware == mode


def test_an_unknown_mode_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match="'class-aware' must be one of 'auto', 'on', 'off'"):
        RunConfig.from_run_config({"class-aware": "yes"})


def test_auto_builds_the_class_layer_only_where_it_applies() -> None:
    generator, discriminator = _models()
    for overrides, layered in (({}, True), ({"strategy": "median"}, False)):
        cfg = RunConfig.defaults(**overrides)
        strategy = build_strategy(cfg, pack_gan(generator, discriminator),
                                  buffer_keys(generator, discriminator), CollectingSink(), 2,
                                  num_classes=CLASSES, partitions=lambda n: COUNTS[:n])
        layers = []
        while strategy is not None:
            layers.append(type(strategy).__name__)
            strategy = getattr(strategy, "strategy", None)
        assert ("ClassAware" in layers) == layered, layers


@pytest.mark.slow
def test_a_run_with_class_aware_aggregation_on_pathological_clients(
        tiny_run_config: dict, tmp_path: Path) -> None:
    # Prepare: two clients of two classes each, conditional, class-aware
    run_config = {**tiny_run_config, "conditional": True, "class-aware": "on",
                  "partitioner": "pathological"}
    grid = InProcessGrid(client_app.app, num_nodes=2, run_config=run_config)

    # Execute
    server_main(grid, server_context(run_config))

    # Assert: both rounds updated the model from both clients
    rows = RunFolder(Path(run_config["output-dir"]) / "test-run").metrics_rows()
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert all(float(r["replies-accepted"]) == 2 and float(r["model-updated"]) == 1
               for r in rows)
