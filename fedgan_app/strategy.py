"""FedGAN strategy: FedAvg over G and D with per-reply validation and metadata.

FedGAN (Rasouli et al., 2020) averages each agent's generator and
discriminator every K local steps, weighting agent j by p_j = |R_j| / sum |R_k|.
That is Flower's FedAvg weighted by `num-examples`; this class adds what a
server that cannot trust its clients needs: every reply is checked (keys,
shapes, dtypes, finite values, update norm, decodable metadata) and dropped
with a logged reason before any averaging, and decoded metadata goes to the
tracker. Robust alternatives reuse Flower's FedMedian / FedTrimmedAvg math.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from logging import WARNING
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg

from fedgan_app.config import RunConfig
from fedgan_app.metadata import MetadataError, TrainMetadata, decode_metadata

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
METADATA_RECORD_KEY = "metadata"
# Scalars every client reports; a reply with other keys would make Flower's
# metric averaging raise, so it is dropped instead.
CLIENT_METRIC_KEYS = frozenset(
    {"num-examples", "loss-d", "loss-g", "d-x", "d-gz", "wall-time-s", "images-per-s"}
)


class ClientSink(Protocol):
    """Where per-client rows go (RunTracker implements it)."""

    def log_clients(self, server_round: int, rows: list[dict[str, Any]]) -> None:
        """Record one row per client for a round."""


class FedGAN(FedAvg):
    """FedAvg of a packed (G, D) ArrayRecord, with validation and metadata."""

    def __init__(
        self,
        cfg: RunConfig,
        reference: ArrayRecord,
        sink: ClientSink | None = None,
        round_offset: int = 0,
    ) -> None:
        super().__init__(
            fraction_train=cfg.fraction_train,
            fraction_evaluate=cfg.fraction_evaluate,
            min_train_nodes=1,
            min_evaluate_nodes=1 if cfg.fraction_evaluate > 0 else 0,
            min_available_nodes=1,
        )
        self.cfg = cfg
        self.sink = sink
        # Strategy.start counts rounds from 1; a resumed run continues after
        # the checkpoint's round, so every round we see is shifted by this.
        self.round_offset = round_offset
        # Expected key -> (shape, dtype), from the freshly built models.
        self._expected = {
            key: (tuple(arr.shape), str(arr.dtype)) for key, arr in reference.items()
        }
        self._global: dict[str, np.ndarray] = {}
        self._sent = 0
        # Per-round counts and aggregated client metrics, read by the server.
        self.round_metrics: dict[int, dict[str, float]] = {}
        self.round_metadata: dict[int, list[TrainMetadata]] = {}
        self._robust = _robust_aggregator(cfg)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global G and D with this round's schedule and settings."""
        server_round += self.round_offset
        lr_g, lr_d = self.cfg.lr_at(server_round)
        config = ConfigRecord(
            {
                "lr-generator": lr_g,
                "lr-discriminator": lr_d,
                "local-steps": self.cfg.local_steps,
                "batch-size": self.cfg.batch_size,
                "seed": self.cfg.seed,
            }
        )
        # Kept to measure each client's update against it.
        self._global = {k: v.numpy() for k, v in arrays.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent = len(messages)  # replies missing after the timeout are counted
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop invalid replies with a logged reason, then average the rest."""
        server_round += self.round_offset
        replies = list(replies)
        failed = [m for m in replies if m.has_error()]
        for msg in failed:
            log(WARNING, "round %d: node %d failed: %s", server_round,
                msg.metadata.src_node_id, msg.error.reason)
        accepted: list[Message] = []
        metas: list[TrainMetadata] = []
        drops: dict[str, int] = {}
        # One clients.csv row per reply, keyed by id(message), in arrival order.
        rows: dict[int, dict[str, Any]] = {}
        for msg in replies:
            if msg.has_error():
                rows[id(msg)] = _failed_row(msg)
                continue
            meta, reason = self._validate(msg)
            rows[id(msg)] = _client_row(msg, meta, reason)
            if reason is None:
                accepted.append(msg)
                metas.append(meta)
            else:
                kind = reason.split(":", 1)[0]
                drops[kind] = drops.get(kind, 0) + 1
                log(WARNING, "round %d: dropped reply from node %d: %s",
                    server_round, msg.metadata.src_node_id, reason)
        accepted, metas = self._screen_norms(server_round, accepted, metas, drops, rows)

        counts = {
            "replies-accepted": len(accepted),
            "replies-dropped": sum(drops.values()),
            "replies-failed": len(failed),
            "replies-missing": max(0, self._sent - len(replies)),
            "num-examples-total": sum(m.num_examples for m in metas),
            **{f"dropped-{kind}": n for kind, n in drops.items()},
        }
        self.round_metadata[server_round] = metas
        if len(accepted) >= self.cfg.min_train_replies:
            total = sum(m.num_examples for m in metas)
            for msg, meta in zip(accepted, metas, strict=True):
                rows[id(msg)]["weight"] = meta.num_examples / total
        if self.sink is not None and rows:
            self.sink.log_clients(server_round, list(rows.values()))
        if len(accepted) < self.cfg.min_train_replies:
            log(WARNING, "round %d: %d valid replies < min-train-replies=%d; "
                "keeping the previous global model", server_round, len(accepted),
                self.cfg.min_train_replies)
            self.round_metrics[server_round] = {k: float(v) for k, v in counts.items()}
            return None, None

        if self._robust is None:
            arrays, metrics = super().aggregate_train(server_round, accepted)
        else:
            arrays, metrics = self._robust.aggregate_train(server_round, accepted)
        row = {k: float(v) for k, v in (metrics or {}).items()}
        row.update({k: float(v) for k, v in counts.items()})
        self.round_metrics[server_round] = row
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask clients for D's accuracy on the global model (round shifted)."""
        return super().configure_evaluate(server_round + self.round_offset, arrays,
                                          config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Average clients' D accuracy; drop malformed replies instead of failing."""
        server_round += self.round_offset
        valid = []
        for msg in replies:
            if msg.has_error():
                continue
            records = msg.content.metric_records
            metrics = records.get(METRICS_KEY) if len(records) == 1 else None
            if metrics is not None and set(metrics) == {"num-examples", "d-accuracy"} and all(
                isinstance(v, int | float) and math.isfinite(v) and v >= 0
                for v in metrics.values()
            ) and metrics["num-examples"] > 0:
                valid.append(msg)
            else:
                log(WARNING, "round %d: dropped evaluate reply from node %d",
                    server_round, msg.metadata.src_node_id)
        metrics = super().aggregate_evaluate(server_round, valid) if valid else None
        if metrics is not None:
            row = self.round_metrics.setdefault(server_round, {})
            row["client-d-accuracy"] = float(metrics["d-accuracy"])
        return metrics

    def _validate(self, msg: Message) -> tuple[TrainMetadata | None, str | None]:
        """Return (metadata, None) for a usable reply, else (None, reason)."""
        content = msg.content
        if set(content.array_records) != {ARRAYS_KEY}:
            return None, f"records: expected one ArrayRecord '{ARRAYS_KEY}'"
        if set(content.metric_records) != {METRICS_KEY}:
            return None, f"records: expected one MetricRecord '{METRICS_KEY}'"
        metrics = content.metric_records[METRICS_KEY]
        if set(metrics) != CLIENT_METRIC_KEYS:
            return None, f"metrics: keys {sorted(metrics)} != {sorted(CLIENT_METRIC_KEYS)}"
        for key, value in metrics.items():
            if not isinstance(value, int | float) or not math.isfinite(value):
                return None, f"metrics: '{key}' is not a finite number"
        num_examples = metrics["num-examples"]
        if num_examples <= 0:
            return None, f"metrics: num-examples must be > 0, got {num_examples}"
        reason = self._check_arrays(content.array_records[ARRAYS_KEY])
        if reason is not None:
            return None, reason
        try:
            meta = decode_metadata(
                content.config_records.get(METADATA_RECORD_KEY),
                self.cfg.max_metadata_bytes,
            )
        except MetadataError as exc:
            return None, f"metadata: {exc}"
        if meta.num_examples != num_examples:
            return None, (f"metadata: num_examples {meta.num_examples} != "
                          f"num-examples metric {num_examples}")
        return meta, None

    def _check_arrays(self, arrays: ArrayRecord) -> str | None:
        """Reason the arrays do not fit the model, or None when they do."""
        keys = set(arrays)
        if keys != set(self._expected):
            missing = sorted(set(self._expected) - keys)[:3]
            extra = sorted(keys - set(self._expected))[:3]
            return f"keys: missing {missing}, unexpected {extra}"
        for key, (shape, dtype) in self._expected.items():
            array = arrays[key]
            if tuple(array.shape) != shape:
                return f"shape: '{key}' is {tuple(array.shape)}, expected {shape}"
            if str(array.dtype) != dtype:
                return f"dtype: '{key}' is {array.dtype}, expected {dtype}"
            if not np.isfinite(array.numpy()).all():
                return f"non-finite: '{key}' has NaN or Inf"
        return None

    def _screen_norms(
        self,
        server_round: int,
        accepted: list[Message],
        metas: list[TrainMetadata],
        drops: dict[str, int],
        rows: dict[int, dict[str, Any]],
    ) -> tuple[list[Message], list[TrainMetadata]]:
        """Drop updates whose norm is far beyond the median client's."""
        ratio = self.cfg.max_update_norm_ratio
        if ratio == 0 or len(accepted) < 3 or not self._global:
            return accepted, metas
        norms = [_update_norm(m.content[ARRAYS_KEY], self._global) for m in accepted]
        limit = ratio * statistics.median(norms)
        kept_msgs, kept_metas = [], []
        for msg, meta, norm in zip(accepted, metas, norms, strict=True):
            if norm > limit > 0:
                drops["norm"] = drops.get("norm", 0) + 1
                reason = (f"norm: update norm {norm:.3g} > {ratio:g} x median "
                          f"{limit / ratio:.3g}")
                rows[id(msg)].update(status="dropped", reason=reason)
                log(WARNING, "round %d: dropped reply from node %d: %s", server_round,
                    msg.metadata.src_node_id, reason)
            else:
                kept_msgs.append(msg)
                kept_metas.append(meta)
        return kept_msgs, kept_metas


def _robust_aggregator(cfg: RunConfig) -> FedAvg | None:
    """Flower's robust strategy whose aggregation math we reuse, or None."""
    if cfg.aggregation == "median":
        return FedMedian(min_train_nodes=1, min_available_nodes=1)
    if cfg.aggregation == "trimmed-mean":
        return FedTrimmedAvg(beta=cfg.trim_fraction, min_train_nodes=1,
                             min_available_nodes=1)
    return None


def _update_norm(arrays: ArrayRecord, global_arrays: dict[str, np.ndarray]) -> float:
    """L2 norm of (client - global) over floating-point arrays."""
    total = 0.0
    for key, array in arrays.items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating):
            diff = values.astype(np.float64) - global_arrays[key].astype(np.float64)
            total += float(np.square(diff).sum())
    return math.sqrt(total)


def _client_row(msg: Message, meta: TrainMetadata | None,
                reason: str | None) -> dict[str, Any]:
    """One clients.csv row of a reply: its status, and its metadata when it decoded.

    The weight is filled in later, once the accepted replies are known.
    """
    row: dict[str, Any] = {
        "node-id": msg.metadata.src_node_id,
        "status": "accepted" if reason is None else "dropped",
        "reason": reason or "",
        "weight": 0.0,
    }
    if meta is None:
        return row
    tail = max(1, min(10, meta.steps))
    row.update({
        "partition-id": meta.partition_id,
        "num-examples": meta.num_examples,
        "steps": meta.steps,
        "loss-d": _mean(meta.loss_d[-tail:]),
        "loss-g": _mean(meta.loss_g[-tail:]),
        "d-x": _mean(meta.d_x[-tail:]),
        "d-gz": _mean(meta.d_gz[-tail:]),
        "wall-time-s": meta.wall_time_s,
        "converged": int(meta.converged),
        "classes": sum(1 for n in meta.label_histogram if n > 0),
        "label-histogram": ";".join(str(n) for n in meta.label_histogram),
        "device": meta.device,
    })
    return row


def _failed_row(msg: Message) -> dict[str, Any]:
    """The clients.csv row of an error reply: only its node id is known."""
    return {"node-id": msg.metadata.src_node_id, "status": "failed",
            "reason": f"error: {msg.error.reason}", "weight": 0.0}


def _mean(values: list[float]) -> float:
    """Mean of a list (NaN for an empty one)."""
    return float(sum(values) / len(values)) if values else float("nan")

