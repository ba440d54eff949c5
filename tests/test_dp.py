"""Differential privacy ('dp'): Flower's wrappers around the rule, the budget, the checks.

The runs are real (the ServerApp and ClientApps on an in-process grid); the
replies are read on the wire (what a client sends, what the server releases
from them), and epsilon is compared with Google's dp-accounting called
directly. `flwr run` with dp and a resume after a SIGKILL: tests/test_e2e_resume.py.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant as GoogleRdp
from flwr.app import Array, ArrayRecord, Message

from benchmarks.common import read_rows
from fedgan_app.config import RunConfig
from fedgan_app.federation import client_app
from fedgan_app.federation.sampling import ClientSampling
from fedgan_app.federation.strategy import build_strategy
from fedgan_app.federation.wrapper import find_layer
from fedgan_app.gan.models import build_gan, gan_config
from fedgan_app.outputs.checkpoint import load_checkpoint
from fedgan_app.outputs.runfolder import RunFolder
from fedgan_app.privacy.accounting import STATE_KEY, BudgetError, PrivacyBudget
from fedgan_app.privacy.clipping import clip_update, update_norm_of
from fedgan_app.protocol.message import ARRAYS_KEY, buffer_keys, pack_gan
from fedgan_app.server_app import main as server_main
from fedgan_app.settings import ConfigError
from harness.inprocess import InProcessGrid, server_context
from tests.test_strategy import CollectingSink

CLIP = 0.5


def _google_epsilon(z: float, m: int, n: int, rounds: int, delta: float) -> float:
    """Epsilon from dp-accounting itself: rounds x (m of n without replacement, Gaussian z)."""
    accountant = GoogleRdp(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_event.SampledWithoutReplacementDpEvent(
        n, m, dp_event.GaussianDpEvent(z)), rounds)
    return accountant.get_epsilon(delta)


def _dp_config(tiny: dict[str, Any], **extra: Any) -> dict[str, Any]:
    # Narrow nets (about 40,000 parameters): seconds per run, still enough
    # coordinates to measure the noise's scale to within a few percent.
    return {**tiny, "g-width": 8, "d-width": 8, "dp": "server-fixed",
            "dp-noise-multiplier": 0.7, "dp-clipping-norm": CLIP, **extra}


class Wire:
    """Records what each node received and sent (train messages only)."""

    def __init__(self, grid: InProcessGrid, tamper: Any = None) -> None:
        self.sent: list[tuple[int, ArrayRecord, ArrayRecord]] = []  # node, global, reply
        self._received: dict[int, ArrayRecord] = {}
        self._tamper = tamper
        answer = grid._answer

        def spy(msg: Message) -> Message | None:
            if msg.metadata.message_type == "train":
                self._received[msg.metadata.dst_node_id] = msg.content[ARRAYS_KEY]
            return answer(msg)

        grid._answer = spy  # type: ignore[method-assign]
        grid.tamper = self._on_reply

    def _on_reply(self, node: int, reply: Message) -> Message | None:
        if ARRAYS_KEY in reply.content.array_records and node in self._received:
            if self._tamper is not None:
                reply = self._tamper(node, reply, self._received[node])
            self.sent.append((node, self._received[node], reply.content[ARRAYS_KEY]))
        return reply


def _run(run_config: dict[str, Any], nodes: int, tamper: Any = None,
         fail: Any = None) -> tuple[RunFolder, Wire]:
    grid = InProcessGrid(client_app.app, num_nodes=nodes, run_config=run_config, fail=fail)
    wire = Wire(grid, tamper)
    server_main(grid, server_context(run_config))
    return RunFolder(Path(run_config["output-dir"]) / run_config["run-name"]), wire


def _rows(folder: RunFolder) -> list[dict[str, Any]]:
    """metrics.csv's rows, numbers as floats."""
    return read_rows(folder.metrics_csv)


def _buffers(reference: ArrayRecord) -> frozenset[str]:
    cfg = RunConfig.defaults(conditional=False, g_width=8, d_width=8)
    generator, discriminator = build_gan(gan_config(cfg, (1, 28, 28), 10), 0)
    assert set(pack_gan(generator, discriminator).keys()) == set(reference.keys())
    return buffer_keys(generator, discriminator)


# --- the accountant -------------------------------------------------------------------


@pytest.mark.parametrize(("z", "m", "n", "rounds"), [(1.0, 10, 100, 6), (0.6, 3, 7, 5),
                                                     (2.0, 4, 4, 3)])
def test_epsilon_is_dp_accountings_own(z: float, m: int, n: int, rounds: int) -> None:
    cfg = RunConfig.defaults(dp="server-fixed", dp_noise_multiplier=z)
    budget = PrivacyBudget(cfg, n, m)
    projected = budget.epsilon_after(rounds)
    for _ in range(rounds):
        budget.spend()
    expected = _google_epsilon(z, m, n, rounds, 1e-5)
    assert budget.epsilon() == pytest.approx(expected, rel=1e-9)
    assert projected == pytest.approx(expected, rel=1e-9)
    assert budget.releases == rounds


def test_rounds_within_a_target_are_the_most_that_stay_under_it() -> None:
    budget = PrivacyBudget(RunConfig.defaults(dp="server-fixed"), 100, 10)
    fits = budget.rounds_within(3.0, 60)
    assert 0 < fits < 60
    assert budget.epsilon_after(fits) <= 3.0 < budget.epsilon_after(fits + 1)
    assert budget.releases == 0  # projecting spends nothing


def test_no_noise_means_no_privacy() -> None:
    budget = PrivacyBudget(RunConfig.defaults(dp="server-fixed", dp_noise_multiplier=0.0),
                           10, 2)
    assert budget.epsilon() == 0.0
    budget.spend()
    assert budget.epsilon() == math.inf


def test_ledger_round_trips_and_refuses_another_setup(tmp_path: Path) -> None:
    cfg = RunConfig.defaults(dp="server-fixed")
    budget = PrivacyBudget(cfg, 50, 5)
    for _ in range(3):
        budget.spend()
    state = budget.state()
    again = PrivacyBudget(cfg, 50, 5)
    again.load(state, tmp_path / "latest.pt")
    assert again.releases == 3 and again.epsilon() == budget.epsilon()
    with pytest.raises(BudgetError, match="5 of 50 clients with noise multiplier 1"):
        PrivacyBudget(cfg, 50, 10).load(state, "latest.pt")
    other_delta = RunConfig.defaults(dp="server-fixed", dp_delta=1e-6)
    with pytest.raises(BudgetError, match="delta 1e-06"):
        PrivacyBudget(other_delta, 50, 5).load(state, "latest.pt")
    with pytest.raises(BudgetError, match="no privacy ledger"):
        PrivacyBudget(cfg, 50, 5).load({}, "latest.pt")
    with pytest.raises(BudgetError, match="cannot be read"):
        PrivacyBudget(cfg, 50, 5).load({STATE_KEY: "{not json"}, "latest.pt")


# --- settings that would break the guarantee --------------------------------------------


@pytest.mark.parametrize("strategy", ["krum", "median", "fedadam", "fedavgm", "trimmed-mean"])
def test_dp_refuses_rules_the_noise_is_not_calibrated_to(strategy: str) -> None:
    with pytest.raises(ConfigError, match=f"not '{strategy}'"):
        RunConfig.defaults(dp="server-fixed", strategy=strategy)


def test_dp_refuses_class_aware_and_a_target_without_noise_or_dp() -> None:
    with pytest.raises(ConfigError, match="'class-aware' cannot be used with 'dp'"):
        RunConfig.defaults(dp="client-fixed", class_aware=True)
    with pytest.raises(ConfigError, match="needs dp-noise-multiplier > 0"):
        RunConfig.defaults(dp="server-fixed", dp_noise_multiplier=0.0, dp_target_epsilon=5.0)
    with pytest.raises(ConfigError, match="needs differential privacy"):
        RunConfig.defaults(dp_target_epsilon=5.0)
    for rule in ("fedavg", "fedprox"):
        assert RunConfig.defaults(dp="server-adaptive", strategy=rule).private


def test_adaptive_noise_the_count_cannot_pay_for_is_refused_by_name(tmp_path: Path) -> None:
    # Flower: z must stay below 2 x the clipped count's noise (m / 20 by default).
    cfg = RunConfig.defaults(dp="server-adaptive", dp_noise_multiplier=1.0)
    generator, discriminator = build_gan(gan_config(cfg, (1, 28, 28), 10), 0)
    reference = pack_gan(generator, discriminator)
    with pytest.raises(ConfigError, match="'server-adaptive' with 4 clients per round"):
        build_strategy(cfg, reference, buffer_keys(generator, discriminator),
                       CollectingSink(), 4, partitions=lambda n: [[1] * 10] * n,
                       budget=PrivacyBudget(cfg, 4, 4))


def test_dp_sampling_uses_a_secret_seed() -> None:
    cfg = RunConfig.defaults(dp="server-fixed", fraction_train=0.5, conditional=False)
    generator, discriminator = build_gan(gan_config(cfg, (1, 28, 28), 10), 0)
    reference = pack_gan(generator, discriminator)
    seeds = set()
    for _ in range(2):
        strategy = build_strategy(cfg, reference, buffer_keys(generator, discriminator),
                                  CollectingSink(), 4, partitions=lambda n: [[1] * 10] * n,
                                  budget=PrivacyBudget(cfg, 4, 2))
        seeds.add(find_layer(strategy, ClientSampling).sampler.seed)
    assert cfg.seed not in seeds and len(seeds) == 2


# --- clipping ----------------------------------------------------------------------------


def test_clip_update_clips_parameters_only_and_keeps_dtypes() -> None:
    cfg = RunConfig.defaults(conditional=False)
    g0, d0 = build_gan(gan_config(cfg, (1, 28, 28), 10), 0)
    g1, d1 = build_gan(gan_config(cfg, (1, 28, 28), 10), 1)
    reference, record = pack_gan(g0, d0), pack_gan(g1, d1)
    buffers = buffer_keys(g0, d0)
    before = update_norm_of(record, reference, buffers)
    clipped, norm = clip_update(record, reference, buffers, 1.0)
    assert norm == pytest.approx(before) and before > 1.0
    assert update_norm_of(clipped, reference, buffers) == pytest.approx(1.0, rel=1e-5)
    for key in record.keys():
        assert clipped[key].numpy().dtype == record[key].numpy().dtype
        if key in buffers:
            np.testing.assert_array_equal(clipped[key].numpy(), record[key].numpy())
    same, _ = clip_update(record, reference, buffers, 10 * before)
    for key in record.keys():
        np.testing.assert_allclose(same[key].numpy(), record[key].numpy(), atol=1e-7)


# --- real runs ----------------------------------------------------------------------------


def test_server_fixed_releases_the_clipped_mean_plus_noise_of_the_right_scale(
        tiny_run_config: dict[str, Any]) -> None:
    # Prepare: one round of 3 clients, every one sampled (m = 3)
    z = 0.7
    config = _dp_config(tiny_run_config, **{"num-server-rounds": 1, "eval-every": 1,
                                            "dp-noise-multiplier": z})
    folder, wire = _run(config, nodes=3)
    released = ArrayRecord(OrderedDict(load_checkpoint(folder.latest_pt).state))
    node, sent_global, _ = wire.sent[0]
    buffers = _buffers(sent_global)

    # Expected without noise: the global plus the mean of the clipped updates
    clipped = [clip_update(reply, glob, buffers, CLIP)[0] for _, glob, reply in wire.sent]
    residual = []
    for key in sent_global.keys():
        if key in buffers:  # the server keeps its own buffers under DP
            np.testing.assert_array_equal(released[key].numpy(), sent_global[key].numpy())
            continue
        mean = np.mean([c[key].numpy().astype(np.float64) for c in clipped], axis=0)
        residual.append((released[key].numpy() - mean).ravel())
    noise = np.concatenate(residual)

    # Assert: every client's update was above the norm, the noise is N(0, (z C / m)^2)
    assert len(wire.sent) == 3
    assert all(update_norm_of(r, g, buffers) > CLIP for _, g, r in wire.sent)
    expected = z * CLIP / 3
    assert noise.std() == pytest.approx(expected, rel=0.03)
    assert abs(noise.mean()) < 5 * expected / math.sqrt(noise.size)
    rows = _rows(folder)
    assert rows[-1]["dp-epsilon"] == pytest.approx(_google_epsilon(z, 3, 3, 1, 1e-5))
    assert rows[-1]["dp-clipping-norm"] == CLIP
    assert folder.summary()["final/dp-epsilon"] == rows[-1]["dp-epsilon"]


def test_client_fixed_updates_leave_clipped_and_an_unclipped_one_is_clipped_again(
        tiny_run_config: dict[str, Any]) -> None:
    # Prepare: node 101 undoes its clipping (sends 10x its update)
    def unclip(node: int, reply: Message, received: ArrayRecord) -> Message:
        if node != 101:
            return reply
        record = reply.content[ARRAYS_KEY]
        reply.content[ARRAYS_KEY] = ArrayRecord({
            k: Array(np.asarray(received[k].numpy() + 10 * (record[k].numpy()
                                                            - received[k].numpy()))
                     .astype(record[k].numpy().dtype)) for k in record.keys()})
        return reply

    config = _dp_config(tiny_run_config, dp="client-fixed")
    folder, wire = _run(config, nodes=3, tamper=unclip)
    buffers = _buffers(wire.sent[0][1])

    # Assert: on the wire, honest updates are at most the norm; the cheat is 10x it
    norms = {(node, i): update_norm_of(reply, glob, buffers)
             for i, (node, glob, reply) in enumerate(wire.sent)}
    honest = [v for (node, _), v in norms.items() if node != 101]
    assert honest and max(honest) <= CLIP * (1 + 1e-5)
    assert min(honest) > CLIP * 0.99  # the default recipe's updates are far above 0.5
    assert all(v > 9 * CLIP for (node, _), v in norms.items() if node == 101)
    rows = _rows(folder)
    assert [r["dp-reclipped"] for r in rows] == [1, 1]
    assert [r["model-updated"] for r in rows] == [1, 1]
    assert rows[-1]["dp-releases"] == 2


@pytest.mark.slow  # a whole in-process run: the full suite, not the fast subset
def test_a_round_short_of_a_sampled_client_releases_nothing(
        tiny_run_config: dict[str, Any]) -> None:
    # Prepare: node 102 fails its second train request (round 2)
    trained: list[int] = []

    def fail(node: int, msg: Message) -> bool:
        if msg.metadata.message_type != "train":
            return False
        trained.append(node)
        return node == 102 and trained.count(102) == 2

    folder, _ = _run(_dp_config(tiny_run_config), nodes=3, fail=fail)

    rows = _rows(folder)
    assert [r["model-updated"] for r in rows] == [1, 0]
    assert [r["dp-releases"] for r in rows] == [1, 1]
    assert rows[1]["dp-epsilon"] == rows[0]["dp-epsilon"]


@pytest.mark.slow  # a whole in-process run: the full suite, not the fast subset
def test_a_zero_update_is_dropped_not_a_crash(tiny_run_config: dict[str, Any]) -> None:
    def send_back(node: int, reply: Message, received: ArrayRecord) -> Message:
        if node == 101:
            reply.content[ARRAYS_KEY] = received
        return reply

    folder, _ = _run(_dp_config(tiny_run_config), nodes=2, tamper=send_back)

    rows = _rows(folder)
    assert [r["dropped-dp"] for r in rows] == [1, 1]
    assert [r["model-updated"] for r in rows] == [0, 0]
    assert rows[-1]["dp-epsilon"] == 0.0


@pytest.mark.slow  # a whole in-process run: the full suite, not the fast subset
def test_resume_goes_on_spending_the_same_budget(tiny_run_config: dict[str, Any]) -> None:
    # Prepare: 2 private rounds, then a resume to 3
    config = _dp_config(tiny_run_config, **{"fraction-train": 0.5})
    folder, _ = _run(config, nodes=4)
    saved = load_checkpoint(folder.latest_pt)
    assert STATE_KEY in saved.strategy_state

    # Execute
    _run({**config, "num-server-rounds": 3, "resume-from": str(folder.path)}, nodes=4)

    # Assert: epsilon of 3 releases, as if the run had never stopped
    rows = _rows(folder)
    assert [r["dp-releases"] for r in rows] == [1, 2, 3]
    assert rows[-1]["dp-epsilon"] == pytest.approx(_google_epsilon(0.7, 2, 4, 3, 1e-5))


@pytest.mark.slow  # a whole in-process run: the full suite, not the fast subset
def test_resuming_a_run_without_dp_with_dp_is_refused(tiny_run_config: dict[str, Any]) -> None:
    folder, _ = _run({**tiny_run_config, "g-width": 8, "d-width": 8}, nodes=2)
    config = _dp_config(tiny_run_config, **{"num-server-rounds": 3,
                                            "resume-from": str(folder.path)})
    with pytest.raises(ConfigError, match="no privacy ledger"):
        _run(config, nodes=2)


@pytest.mark.slow  # a whole in-process run: the full suite, not the fast subset
def test_target_epsilon_ends_the_run_before_the_round_that_would_exceed_it(
        tiny_run_config: dict[str, Any]) -> None:
    # Prepare: a target between the epsilon of 2 and of 3 rounds (2 of 4 per round)
    two, three = (_google_epsilon(1.0, 2, 4, r, 1e-5) for r in (2, 3))
    config = _dp_config(tiny_run_config, **{
        "num-server-rounds": 6, "fraction-train": 0.5, "dp-noise-multiplier": 1.0,
        "dp-target-epsilon": (two + three) / 2})

    folder, _ = _run(config, nodes=4)

    rows = _rows(folder)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[-1]["dp-epsilon"] == pytest.approx(two)
    assert "fid" in rows[-1]  # scored as the last round
    assert folder.summary()["final/dp-epsilon"] == pytest.approx(two)
    # A resume of the spent run says so
    with pytest.raises(ConfigError, match="the budget is spent"):
        _run({**config, "resume-from": str(folder.path)}, nodes=4)


@pytest.mark.slow  # a whole in-process run: the full suite, not the fast subset
def test_the_dashboard_and_the_log_line_show_epsilon(tiny_run_config: dict[str, Any],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="flwr")
    folder, _ = _run(_dp_config(tiny_run_config), nodes=2)
    page = folder.dashboard_html.read_text()
    assert "privacy spent: epsilon" in page
    epsilon = _rows(folder)[-1]["dp-epsilon"]
    assert f"epsilon {epsilon:.4g}" in caplog.text
    assert torch.isfinite(torch.tensor(epsilon))
