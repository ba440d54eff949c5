"""Honest aggregation weights: a client's claimed `num-examples` cannot buy the average.

FedAvg weights client j by the examples it reports. Two policies (setting
'weight-check') keep a claim from capturing the average:

- ``partition-size`` (default): the server holds the run's partitioning (the
  dataset, partitioner and seed every node uses, as in simulation and in this
  app's deployment), so it knows each partition's size and label counts. A
  reply whose claim differs from its node's partition is dropped
  (`fedgan_app.federation.fedgan`).
- ``cap``: for nodes that bring data the server cannot see. Claims above
  'weight-cap-ratio' times the round's median claim are clipped to it, then
  no reply's share of the average may exceed 'max-weight-share' (`cap_weights`).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


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
