"""Honest aggregation weights: a client's claimed `num-examples` cannot buy the average.

FedAvg weights client j by the examples it reports. Two policies (setting
'weight-check') keep a claim from capturing the average:

- ``partition-size`` (default): the server holds the run's partitioning (the
  dataset, partitioner and seed every node uses, as in simulation and in this
  app's deployment), so it knows each partition's size and label counts. A
  reply whose claim differs from its node's partition is dropped by the reply
  screen (`fedgan_app.federation.checks.check_claim`).
- ``cap``: for nodes that bring data the server cannot see. Claims above
  'weight-cap-ratio' times the round's median claim are clipped to it, then
  no reply's share of the average may exceed 'max-weight-share' (`cap_weights`,
  applied by the `WeightCap` layer to the replies that passed the screen).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from logging import INFO, WARNING

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy

from fedgan_app.config import RunConfig
from fedgan_app.federation.report import RoundReport
from fedgan_app.federation.wrapper import Wrapper
from fedgan_app.protocol.message import METRICS_KEY, NUM_EXAMPLES


def cap_weights(claims: Sequence[float], median_ratio: float,
                max_share: float) -> tuple[list[float], int]:
    """Shares of the average for claimed example counts, capped; and how many were capped.

    Parameters
    ----------
    claims : Sequence[float]
        Each reply's claimed `num-examples` (> 0).
    median_ratio : float
        Claims above this multiple of the median claim are clipped to it (0: no clip).
    max_share : float
        Largest share one reply may have (1: no cap). Unreachable when there are
        fewer than 1 / max_share replies: then every reply gets an equal share.

    Returns
    -------
    tuple[list[float], int]
        Shares adding up to 1, in the order of `claims`, and the number of
        replies whose share was lowered by either cap.

    """
    if not claims:
        return [], 0
    limit = median_ratio * statistics.median(claims) if median_ratio > 0 else float("inf")
    clipped = [min(float(c), limit) for c in claims]
    capped = {i for i, c in enumerate(claims) if c > limit}
    if max_share * len(claims) < 1:  # the cap cannot hold: equal shares are the closest
        equal = 1 / len(claims)
        capped |= {i for i, c in enumerate(clipped) if c / sum(clipped) > equal}
        return [equal] * len(claims), len(capped)
    shares = _water_fill(clipped, max_share)
    capped |= {i for i, (c, s) in enumerate(zip(clipped, shares, strict=True))
               if s < c / sum(clipped) - 1e-12}
    return shares, len(capped)


def _water_fill(weights: list[float], cap: float) -> list[float]:
    """Normalise `weights` so that none exceeds `cap`: the excess goes to the others pro rata."""
    shares = [0.0] * len(weights)
    free = list(range(len(weights)))
    left = 1.0
    while free:
        total = sum(weights[i] for i in free)
        over = [i for i in free if left * weights[i] / total > cap]
        if not over:
            for i in free:
                shares[i] = left * weights[i] / total
            return shares
        for i in over:
            shares[i] = cap
        left -= cap * len(over)
        free = [i for i in free if i not in over]
    return shares


class WeightCap(Wrapper):
    """'weight-check' = cap: each reply's weight is its capped claim, for every layer below.

    The claims are the replies' `num-examples` metrics (equal to their checked
    metadata); a capped reply's metric is lowered to its capped share of the
    claims' total, which the buffers and Flower's rule then weight by.
    """

    def __init__(self, strategy: Strategy, cfg: RunConfig, report: RoundReport) -> None:
        super().__init__(strategy)
        self.cfg = cfg
        self.report = report

    def summary(self) -> None:
        """Log the caps, then the layers below."""
        log(INFO, "\t├──> weights: claims clipped to %g x the median claim, shares "
            "capped at %g (weight-check cap)", self.cfg.weight_cap_ratio,
            self.cfg.max_weight_share)
        self.strategy.summary()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Cap the replies' weights, then let the layers below aggregate."""
        replies = list(replies)
        claims = [float(m.content[METRICS_KEY][NUM_EXAMPLES]) for m in replies]
        shares, capped = cap_weights(claims, self.cfg.weight_cap_ratio,
                                     self.cfg.max_weight_share)
        self.report.capped = capped
        if capped:
            total = sum(claims)
            for msg, share in zip(replies, shares, strict=True):
                msg.content[METRICS_KEY][NUM_EXAMPLES] = share * total
            log(WARNING, "round %d: capped the weight of %d replies (claims above %g x the "
                "median claim, shares above %g)", server_round, capped,
                self.cfg.weight_cap_ratio, self.cfg.max_weight_share)
        return self.strategy.aggregate_train(server_round, replies)
