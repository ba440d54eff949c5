"""User-level differential privacy ('dp'): Flower's wrappers, and what they need around them.

DP-FedAvg (McMahan et al. 2018) releases each round's model as the mean of
the m sampled clients' updates, each clipped to norm C, plus Gaussian noise
of standard deviation z x C / m. Flower's wrappers do the clipping and the
noise; they sit right around Flower's rule, inside the buffer split, so they
clip and noise the parameters of G and D (one vector per client) and never
the buffers (`dp_wrapper`)::

    ... Quorum > PrivateRounds > BufferSplit > Flower's DP wrapper > FedAvg

`PrivateRounds` makes the rest of the round fit the guarantee:

* every sampled client or none: a round releases a model only when all m
  sampled clients sent a valid reply (the noise is calibrated to m);
  otherwise it keeps the previous model and spends nothing, as Flower's
  own accounted mode does. A round with fewer than m nodes to send to is
  not sent.
* uniform weights: each reply counts once (the mean of m updates);
  data-size weights would let one client's share, and its sensitivity, grow.
* 'client-fixed': the clients clip (their ClientApp reads the norm Flower's
  wrapper puts into the round's config); the server measures every reply's
  update and clips any above C again, logged, so a client that skips the
  clipping cannot take more than C.
* a reply whose update is zero (no parameter changed) is dropped: Flower's
  clipping divides by the norm.
* the accountant (`fedgan_app.privacy.accounting`) composes each released
  round; epsilon goes into the round's row (metrics.csv, the log line, W&B,
  the dashboard) and its ledger into the checkpoint.

The buffer split keeps the server's own buffers under DP (clients'
BatchNorm statistics are functions of their images and no noise covers
them); the sampling draws from a secret seed (`fedgan_app.federation.sampling`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedgan_app.config import RunConfig
from fedgan_app.federation.report import RoundReport
from fedgan_app.federation.wrapper import Wrapper
from fedgan_app.privacy.accounting import STATE_KEY, PrivacyBudget, budget_line
from fedgan_app.privacy.clipping import CLIP_TOLERANCE, clip_update, update_norm_of
from fedgan_app.protocol.message import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES
from fedgan_app.settings import ConfigError


def dp_wrapper(cfg: RunConfig, rule: Strategy, sample_size: int) -> Strategy:
    """Flower's DP wrapper of the run's 'dp' mode around the rule's strategy.

    ConfigError when Flower refuses the settings (e.g. an adaptive noise
    multiplier the clipped count's noise cannot pay for).
    """
    z, norm = cfg.dp_noise_multiplier, cfg.dp_clipping_norm
    try:
        if cfg.dp == "server-fixed":
            return DifferentialPrivacyServerSideFixedClipping(rule, z, norm, sample_size)
        if cfg.dp == "client-fixed":
            return DifferentialPrivacyClientSideFixedClipping(rule, z, norm, sample_size)
        return DifferentialPrivacyServerSideAdaptiveClipping(
            rule, z, sample_size, initial_clipping_norm=norm,
            target_clipped_quantile=cfg.dp_clipped_quantile,
            clip_norm_lr=cfg.dp_clip_norm_lr,
            clipped_count_stddev=cfg.dp_clipped_count_stddev or None)
    except ValueError as exc:
        raise ConfigError(f"setting 'dp' = {cfg.dp!r} with {sample_size} clients per "
                          f"round: {exc}") from exc


class PrivateRounds(Wrapper):
    """Release a round only as DP-FedAvg's analysis has it; account for every release.

    Parameters
    ----------
    strategy : Strategy
        The buffer split around Flower's DP wrapper (`dp_wrapper`).
    cfg : RunConfig
        The run's DP settings.
    budget : PrivacyBudget
        The run's accountant (already holding a resumed run's ledger).
    buffers : Collection[str]
        Packed keys of the buffers: not part of a client's update.
    report : RoundReport
        The round's report (the drops and re-clips are counted there).

    """

    def __init__(self, strategy: Strategy, cfg: RunConfig, budget: PrivacyBudget,
                 buffers: Collection[str], report: RoundReport) -> None:
        super().__init__(strategy)
        self.cfg = cfg
        self.budget = budget
        self.buffers = frozenset(buffers)
        self.report = report
        self.sample_size = budget.release.sample_size
        self._global: ArrayRecord | None = None

    def summary(self) -> None:
        """Log the mechanism and the budget, then the layers below."""
        log(INFO, "\t├──> %s; clipping %s, norm %g", budget_line(self.budget), self.cfg.dp,
            self.cfg.dp_clipping_norm)
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send to exactly the m sampled clients, or to none."""
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if len(messages) != self.sample_size:
            # Fewer nodes than the run began with, or more: the noise and the ledger
            # are calibrated to m of N, so this round is not trained at all.
            log(WARNING, "round %d: the round would train %d clients, but a private round "
                "of this run trains %d of %d: nothing sent, no budget spent", server_round,
                len(messages), self.sample_size, self.budget.release.population)
            return []
        self._global = arrays
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Release the noised mean of all m clipped updates, or keep the model."""
        replies = [msg for msg in replies if self._usable(server_round, msg)]
        clipping_norm = self._clipping_norm()  # the adaptive rule moves it as it aggregates
        arrays, metrics = None, None
        if len(replies) == self.sample_size:
            for msg in replies:
                # The mean of m updates: each reply counts once, whatever its size.
                msg.content[METRICS_KEY][NUM_EXAMPLES] = 1
            arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        else:
            log(WARNING, "round %d: %d of the %d sampled clients sent a valid update; a "
                "private round needs all of them: keeping the previous global model, no "
                "budget spent", server_round, len(replies), self.sample_size)
        if arrays is not None:
            self.budget.spend()
            log(INFO, "round %d: private release %d, epsilon %.4g at delta %g",
                server_round, self.budget.releases, self.budget.epsilon(), self.budget.delta)
        self.report.privacy = {"dp-epsilon": self.budget.epsilon(),
                               "dp-releases": float(self.budget.releases),
                               "dp-clipping-norm": clipping_norm}
        return arrays, metrics

    def state(self) -> dict[str, Any]:
        """The layers below's state and the accountant's ledger."""
        return {**super().state(), **self.budget.state()}

    def load_state(self, state: Mapping[str, Any], source: Path | str) -> None:
        """The layers below's state (the ledger is loaded into the budget before the run)."""
        super().load_state({k: v for k, v in state.items() if k != STATE_KEY}, source)

    def _usable(self, server_round: int, msg: Message) -> bool:
        """Whether a checked reply can enter the mean; re-clip one the client did not clip."""
        if self._global is None:
            return False
        record = msg.content[ARRAYS_KEY]
        norm = update_norm_of(record, self._global, self.buffers)
        if not math.isfinite(norm) or norm == 0:
            self.report.dropped["dp"] = self.report.dropped.get("dp", 0) + 1
            log(WARNING, "round %d: dropped reply from node %d: its update's norm is %g",
                server_round, msg.metadata.src_node_id, norm)
            return False
        limit = self.cfg.dp_clipping_norm
        if self.cfg.dp == "client-fixed" and norm > limit * (1 + CLIP_TOLERANCE):
            msg.content[ARRAYS_KEY], _ = clip_update(record, self._global, self.buffers,
                                                     limit)
            self.report.reclipped += 1
            log(WARNING, "round %d: node %d sent an update of norm %.4g, above the "
                "clipping norm %g it was asked to clip to: clipped on the server",
                server_round, msg.metadata.src_node_id, norm, limit)
        return True

    def _clipping_norm(self) -> float:
        """The norm updates are clipped to now (Flower's wrapper, below the buffer split)."""
        dp_layer = getattr(self.strategy, "strategy", None)
        return float(getattr(dp_layer, "clipping_norm", self.cfg.dp_clipping_norm))
