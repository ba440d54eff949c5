"""The outermost layer: the run's rounds, as `Strategy.start` drives them.

A resumed run's `Strategy.start` counts its rounds from 1 again. This layer
turns each of them into the run's round once (`RoundSink.absolute`), so
every layer below, Flower's rule included, sees the run's numbering; it
sends that round's `RoundConfig` (scheduled learning rates, local steps,
batch size, seed), times the round, and hands the round's `RoundReport`
(which the layers below filled in) and the server optimizer's state to the
sink (the Recorder) once the round is aggregated.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedgan_app.config import RunConfig
from fedgan_app.federation.report import RoundReport, RoundSink
from fedgan_app.federation.wrapper import Wrapper
from fedgan_app.protocol.message import D_ACCURACY, RoundConfig


class RunRounds(Wrapper):
    """Number the rounds as the run does, send their config, hand their report to the sink.

    Parameters
    ----------
    strategy : Strategy
        The layers below (sampling, the reply screen, ...).
    cfg : RunConfig
        The run's schedule (learning rates, local steps, batch size, seed).
    sink : RoundSink
        Numbers the rounds and takes each round's row, per-reply rows and
        optimizer state (the Recorder).
    report : RoundReport
        The round's facts, filled in by the layers below.

    """

    def __init__(self, strategy: Strategy, cfg: RunConfig, sink: RoundSink,
                 report: RoundReport) -> None:
        super().__init__(strategy)
        self.cfg = cfg
        self.sink = sink
        self.report = report
        self._sent = 0
        self._sent_at = time.perf_counter()

    def summary(self) -> None:
        """Log the schedule, then the layers below."""
        log(INFO, "\t├──> FedGAN: %d local steps of batch %d per round, round numbers "
            "from %d", self.cfg.local_steps, self.cfg.batch_size, self.sink.absolute(1))
        self.strategy.summary()

    def round_config(self, server_round: int) -> RoundConfig:
        """What a train request of the run's round `server_round` carries."""
        lr_g, lr_d = self.cfg.lr_at(server_round)
        return RoundConfig(server_round=server_round, lr_generator=lr_g, lr_discriminator=lr_d,
                           local_steps=self.cfg.local_steps, batch_size=self.cfg.batch_size,
                           seed=self.cfg.seed)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global G and D with this round's schedule and settings."""
        server_round = self.sink.absolute(server_round)
        self.report.clear()
        config = self.round_config(server_round).to_record()
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        # Kept to count replies missing after the timeout.
        self._sent, self._sent_at = len(messages), time.perf_counter()
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate below, then hand the round's row to the sink."""
        server_round = self.sink.absolute(server_round)
        started = time.perf_counter()
        replies = list(replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        report = self.report
        report.missing = max(0, self._sent - len(replies))
        # Seconds from sending the model to having every reply (clients, Flower
        # messaging, idle slots), and of the checks and the aggregation.
        report.time_clients_s = started - self._sent_at
        report.time_aggregate_s = time.perf_counter() - started
        self.sink.record_train(server_round, report.row(metrics, arrays is not None),
                               list(report.clients), self.state())
        self._sent = 0
        report.clear()
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask the layers below for this round's evaluate messages."""
        return self.strategy.configure_evaluate(self.sink.absolute(server_round), arrays,
                                                config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Average clients' D accuracy below, then hand it to the sink."""
        server_round = self.sink.absolute(server_round)
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.sink.record_evaluate(server_round,
                                      {"client-d-accuracy": float(metrics[D_ACCURACY])})
        return metrics
