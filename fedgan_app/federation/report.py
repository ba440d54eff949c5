"""One round's report: what each layer of the strategy learns, pushed to one object.

The layers (`fedgan_app.federation.strategy`) share one `RoundReport` and
each fills in its own facts: the sampling layer the query's seconds, the
reply screen the counts and one row per reply, the weight cap how many
weights it lowered. The outermost layer (`fedgan_app.federation.rounds`)
clears it when a round starts and hands it to the `RoundSink` (the Recorder)
once the round is aggregated: `row` is the one place that lays out the
round's columns of metrics.csv.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from flwr.app import MetricRecord


class RoundSink(Protocol):
    """Where the strategy pushes what it learns in a round (the Recorder)."""

    def absolute(self, local_round: int) -> int:
        """The run's round number of a round of this `Strategy.start`."""

    def record_train(self, server_round: int, row: dict[str, float],
                     clients: list[dict[str, Any]], strategy_state: dict[str, Any]) -> None:
        """Take a round's counts and metrics, its per-reply rows, the optimizer state."""

    def record_evaluate(self, server_round: int, row: dict[str, float]) -> None:
        """Take a round's aggregated client-evaluation metrics."""


@dataclass
class RoundReport:
    """The facts of one training round, as the layers push them."""

    accepted: int = 0  # replies that passed every check
    dropped: dict[str, int] = field(default_factory=dict)  # reason kind -> replies
    failed: int = 0  # error replies
    missing: int = 0  # messages sent that no reply answered in time
    validated: int = 0  # checks run: one per reply, never more
    examples_total: float = 0.0  # the examples the average counted (capped as capped)
    capped: int = 0  # replies whose weight 'weight-check' = cap lowered
    time_clients_s: float = 0.0  # from sending the model to having every reply
    time_aggregate_s: float = 0.0  # the checks and the aggregation
    time_query_s: float = 0.0  # asking nodes for their partition before this round
    clients: list[dict[str, Any]] = field(default_factory=list)  # clients.csv rows
    reclipped: int = 0  # 'client-fixed' replies the server had to clip again
    privacy: dict[str, float] = field(default_factory=dict)  # dp-epsilon, ... (dp only)
    # id(accepted reply) -> its checked label histogram (class-aware aggregation)
    class_counts: dict[int, list[int]] = field(default_factory=dict)

    def clear(self) -> None:
        """Forget the last round: every fact back to its default."""
        for item in fields(self):
            fresh = item.default_factory() if callable(item.default_factory) else item.default
            setattr(self, item.name, fresh)

    def row(self, metrics: MetricRecord | None, updated: bool) -> dict[str, float]:
        """The round's metrics.csv columns: the clients' averaged metrics, then the counts."""
        row = {k: float(v) for k, v in (metrics or {}).items()}
        row.update({
            "replies-accepted": self.accepted,
            "replies-dropped": sum(self.dropped.values()),
            "replies-failed": self.failed,
            "replies-missing": self.missing,
            "replies-validated": self.validated,
            "num-examples-total": self.examples_total,
            "weights-capped": self.capped,
            "model-updated": int(updated),
            **{f"dropped-{kind}": n for kind, n in self.dropped.items()},
            "time-clients-s": self.time_clients_s,
            "time-aggregate-s": self.time_aggregate_s,
            "time-query-s": self.time_query_s,
            **self.privacy,
        })
        if self.privacy:
            row["dp-reclipped"] = self.reclipped
        return {k: float(v) for k, v in row.items()}
