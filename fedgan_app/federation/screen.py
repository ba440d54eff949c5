"""The reply screen: every reply checked once, a bad one dropped with its reason.

FedGAN (Rasouli et al., 2020) averages each agent's generator and
discriminator every K local steps. A server that cannot trust its clients
first checks every reply (`fedgan_app.federation.checks`: records, metrics,
arrays and their .npy headers, the bounded metadata decode, the round, and
with 'weight-check' = partition-size the node's partition and its label
counts), lets one node train each partition once per round, then drops
updates whose norm is far beyond the median client's. Any exception while
checking one reply drops only that reply. The layers below see only the
replies that passed; every reply gets one clients.csv row with its status,
its reason and its final weight in the average.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedgan_app.config import RunConfig
from fedgan_app.federation.checks import (
    Partitions,
    check_claim,
    check_train_reply,
    expected_arrays,
    update_norm,
    valid_evaluate_reply,
)
from fedgan_app.federation.report import RoundReport
from fedgan_app.federation.sampling import PartitionSampler
from fedgan_app.federation.wrapper import Wrapper
from fedgan_app.protocol.message import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES, mean
from fedgan_app.protocol.metadata import TrainMetadata, clip_text


@dataclass
class _Screened:
    """The replies of one round after the checks."""

    accepted: list[Message] = field(default_factory=list)
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)  # id(reply) -> row
    drops: dict[str, int] = field(default_factory=dict)  # reason kind -> count
    failed: int = 0

    def drop(self, msg: Message, reason: str) -> None:
        """Count a dropped reply and say why in its row."""
        kind = reason.split(":", 1)[0]
        self.drops[kind] = self.drops.get(kind, 0) + 1
        self.rows[id(msg)].update(status="dropped", reason=reason)


class ReplyScreen(Wrapper):
    """Check every reply once; the layers below get only those that passed.

    Parameters
    ----------
    strategy : Strategy
        The layers below (weights, quorum, buffers, the rule).
    cfg : RunConfig
        The run's settings (metadata bound, norm ratio).
    reference : ArrayRecord
        The packed global model as built: the keys, shapes and dtypes every
        reply must have.
    report : RoundReport
        Takes the round's counts and one row per reply.
    num_classes : int | None
        Classes of the run's dataset: every label histogram's length.
    claims : tuple[PartitionSampler, Partitions] | None
        For 'weight-check' = partition-size: who holds which partition, and
        each partition's label counts; a reply must claim exactly its node's.

    """

    def __init__(self, strategy: Strategy, cfg: RunConfig, reference: ArrayRecord,
                 report: RoundReport, num_classes: int | None = None,
                 claims: tuple[PartitionSampler, Partitions] | None = None) -> None:
        super().__init__(strategy)
        self.cfg = cfg
        self.report = report
        self.num_classes = num_classes
        self.claims = claims
        self._expected = expected_arrays(reference)
        self._global: dict[str, np.ndarray] = {}  # the model sent: updates are measured from it
        self._sent_messages: list[Message] = []  # to name the node of a SuperLink's error
        self._validations = 0  # checks run this round: one per reply, never more

    def summary(self) -> None:
        """Log the checks, then the layers below."""
        log(INFO, "\t├──> reply checks: keys, shapes, dtypes, finite values, metadata "
            "(max %d bytes), update norm (ratio %g)", self.cfg.max_metadata_bytes,
            self.cfg.max_update_norm_ratio)
        if self.claims is not None:
            log(INFO, "\t├──> weights: each claim must equal its node's partition "
                "(weight-check partition-size)")
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The layers below's messages; the model sent is kept to measure updates."""
        self._global = {k: v.numpy() for k, v in arrays.items()}
        self._sent_messages = list(self.strategy.configure_train(server_round, arrays,
                                                                 config, grid))
        return self._sent_messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply once, then let the layers below aggregate the rest."""
        screened = self._screen(server_round, list(replies))
        arrays, metrics = self.strategy.aggregate_train(server_round, screened.accepted)
        # Each accepted reply's weight as the layers below left it (capped or not).
        weights = [float(m.content[METRICS_KEY][NUM_EXAMPLES]) for m in screened.accepted]
        if arrays is not None:
            for msg, weight in zip(screened.accepted, weights, strict=True):
                screened.rows[id(msg)]["weight"] = weight / sum(weights)
        # Layers below may drop an accepted reply too (dp: an update of norm zero).
        below = self.report.dropped
        self.report.accepted = len(screened.accepted) - sum(below.values())
        self.report.dropped = dict(screened.drops)
        for kind, count in below.items():
            self.report.dropped[kind] = self.report.dropped.get(kind, 0) + count
        self.report.failed = screened.failed
        self.report.validated = self._validations
        self.report.examples_total = sum(weights)
        self.report.clients = list(screened.rows.values())
        self._sent_messages = []
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Average clients' D accuracy over the well-formed replies; drop the others."""
        valid = []
        for msg in replies:
            if msg.has_error():
                continue
            try:
                usable = valid_evaluate_reply(msg)
            except Exception:  # noqa: BLE001 - a hostile reply must not stop the round
                usable = False
            if usable:
                valid.append(msg)
            else:
                log(WARNING, "round %d: dropped evaluate reply from node %d",
                    server_round, msg.metadata.src_node_id)
        return self.strategy.aggregate_evaluate(server_round, valid) if valid else None

    def _screen(self, server_round: int, replies: list[Message]) -> _Screened:
        """Validate each reply once, then screen update norms; one row per reply.

        Any exception while handling one reply is that reply's failure: it is
        dropped, counted and logged once, and the round goes on.
        """
        screened = _Screened()
        self._validations = 0
        trained: dict[int, int] = {}  # partition -> the node whose reply was accepted
        for msg in replies:
            try:
                self._screen_one(server_round, msg, screened, trained)
            except Exception as exc:  # noqa: BLE001 - a hostile reply must not stop the round
                screened.rows.setdefault(id(msg), _base_row(msg))
                self._drop(server_round, screened, msg,
                           f"error: {type(exc).__name__} while checking the reply")
        self._screen_norms(server_round, screened)
        return screened

    def _screen_one(self, server_round: int, msg: Message, screened: _Screened,
                    trained: dict[int, int]) -> None:
        """Check one reply: accept it, or drop it with a reason."""
        if msg.has_error():
            screened.failed += 1
            node = self._node_of_error(msg)
            screened.rows[id(msg)] = _failed_row(msg, node)
            log(WARNING, "round %d: node %d failed: %s", server_round, node,
                clip_text(msg.error.reason))
            return
        screened.rows[id(msg)] = _base_row(msg)
        self._validations += 1
        meta, reason = check_train_reply(msg, self._expected, self.cfg.max_metadata_bytes,
                                         self.num_classes, server_round)
        if reason is None and meta is not None and self.claims is not None:
            reason = check_claim(msg.metadata.src_node_id, meta, *self.claims)
        if reason is None and meta is not None:
            holder = trained.get(meta.partition_id)
            if holder is not None:
                reason = (f"partition: partition {meta.partition_id} is already trained by "
                          f"node {holder} this round")
        if meta is not None:
            screened.rows[id(msg)] = _client_row(msg, meta)
        if reason is not None or meta is None:
            self._drop(server_round, screened, msg, reason or "metadata: missing")
            return
        trained[meta.partition_id] = msg.metadata.src_node_id
        screened.accepted.append(msg)
        self.report.class_counts[id(msg)] = list(meta.label_histogram)

    def _drop(self, server_round: int, screened: _Screened, msg: Message,
              reason: str) -> None:
        """Drop a reply: count it, say why in its row, log it once."""
        screened.drop(msg, reason)
        log(WARNING, "round %d: dropped reply from node %d: %s", server_round,
            msg.metadata.src_node_id, reason)

    def _node_of_error(self, msg: Message) -> int:
        """The node an error reply stands for.

        When a node vanishes, the SuperLink answers in its place, with its own id
        as the source; the message the reply answers names the node.
        """
        answered = msg.metadata.reply_to_message_id
        if msg.metadata.src_node_id != SUPERLINK_NODE_ID or not answered:
            return msg.metadata.src_node_id
        for sent in self._sent_messages:
            if sent.metadata.message_id == answered:
                return sent.metadata.dst_node_id
        return msg.metadata.src_node_id

    def _screen_norms(self, server_round: int, screened: _Screened) -> None:
        """Drop updates whose norm is far beyond the median client's."""
        ratio = self.cfg.max_update_norm_ratio
        if ratio == 0 or len(screened.accepted) < 3 or not self._global:
            return
        norms = [update_norm(m.content[ARRAYS_KEY], self._global) for m in screened.accepted]
        limit = ratio * statistics.median(norms)
        for msg, norm in zip(screened.accepted, norms, strict=True):
            if norm > limit > 0:
                self._drop(server_round, screened, msg, f"norm: update norm {norm:.3g} > "
                           f"{ratio:g} x median {limit / ratio:.3g}")
        screened.accepted = _kept(screened.accepted, norms, limit)


def _kept(accepted: Sequence[Message], norms: Sequence[float],
          limit: float) -> list[Message]:
    """The replies whose update norm is within the limit."""
    return [msg for msg, norm in zip(accepted, norms, strict=True) if not norm > limit > 0]


def _base_row(msg: Message) -> dict[str, Any]:
    """The clients.csv row of a reply before its metadata is known.

    Status starts as accepted with weight 0: a drop or the final weights update it.
    """
    return {"node-id": msg.metadata.src_node_id, "status": "accepted", "reason": "",
            "weight": 0.0}


def _client_row(msg: Message, meta: TrainMetadata) -> dict[str, Any]:
    """One clients.csv row of a reply whose metadata decoded (every value checked)."""
    row = _base_row(msg)
    tail = max(1, min(10, meta.steps))
    row.update({
        "partition-id": meta.partition_id,
        "num-examples": meta.num_examples,
        "steps": meta.steps,
        "loss-d": mean(meta.loss_d[-tail:]),
        "loss-g": mean(meta.loss_g[-tail:]),
        "d-x": mean(meta.d_x[-tail:]),
        "d-gz": mean(meta.d_gz[-tail:]),
        "wall-time-s": meta.wall_time_s,
        "converged": int(meta.converged),
        "classes": sum(1 for n in meta.label_histogram if n > 0),
        "label-histogram": ";".join(str(n) for n in meta.label_histogram),
        "device": meta.device,
    })
    return row


def _failed_row(msg: Message, node_id: int) -> dict[str, Any]:
    """The clients.csv row of an error reply: only its node id is known."""
    return {"node-id": node_id, "status": "failed",
            "reason": f"error: {clip_text(msg.error.reason)}", "weight": 0.0}
