"""Buffers never reach the aggregation rule: the layer around Flower's strategy.

BatchNorm running statistics and counters are not gradients, and a server
optimizer's step on them is known to produce NaN (flwrlabs/flower#1060): the
rule (`self.strategy`, Flower's) only ever sees the parameters. This layer
aggregates the buffers itself (their weighted mean, FedAvg's arithmetic, or
their coordinate-wise median under a robust rule, so an attacker cannot move
them either), merges both into the global record with the model's own keys
and dtypes (integer counters rounded), and refuses a result with NaN or Inf.
It also holds the rule's server-optimizer state for checkpoints
(`fedgan_app.federation.server_state`): the rule's arrays are the parameters,
in this layer's order.

Under differential privacy ('dp', `fedgan_app.federation.private`) the
clients' buffers never enter the global model: BatchNorm statistics are
functions of a client's images that no clipping or noise covers. The
server keeps its own (`own_buffers`): G's are recomputed from noise
wherever G is sampled (`fedgan_app.quality.judge`), and D, which trains on
batch statistics, keeps its initial running statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedgan_app.federation.checks import expected_arrays
from fedgan_app.federation.rules import Rule
from fedgan_app.federation.server_state import load_optimizer_state, optimizer_state
from fedgan_app.federation.wrapper import Wrapper
from fedgan_app.protocol.message import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES


class BufferSplit(Wrapper):
    """Parameters to the rule, buffers aggregated here; merged, cast and checked.

    Parameters
    ----------
    strategy : Strategy
        Flower's strategy of the rule (`rule.build`).
    rule : Rule
        The rule's name and whether it is robust (buffers then by median).
    reference : ArrayRecord
        The packed global model as built: its keys and dtypes, in order.
    buffers : frozenset[str]
        Packed keys of the models' buffers (`protocol.message.buffer_keys`).
    own_buffers : bool
        Keep the global model's buffers, never the clients' (under DP).

    """

    def __init__(self, strategy: Strategy, rule: Rule, reference: ArrayRecord,
                 buffers: frozenset[str], own_buffers: bool = False) -> None:
        super().__init__(strategy)
        self.rule = rule
        self.own_buffers = own_buffers
        self._expected = expected_arrays(reference)
        self._buffers = buffers & set(self._expected)
        self._params = [k for k in self._expected if k not in self._buffers]
        self._global: ArrayRecord | None = None

    def summary(self) -> None:
        """Log the split, then the rule's settings."""
        log(INFO, "\t├──> strategy %s (%s) on %d parameter arrays; %d buffers %s",
            self.rule.name, type(self.strategy).__name__, len(self._params),
            len(self._buffers), "kept by the server" if self.own_buffers
            else "by median" if self.rule.robust else "by weighted mean")
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The rule keeps the parameters it steps from; every client gets the whole model."""
        params = ArrayRecord({k: arrays[k] for k in self._params})
        messages = list(self.strategy.configure_train(server_round, params, config, grid))
        self._global = arrays
        for msg in messages:
            msg.content[ARRAYS_KEY] = arrays
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Buffers here, parameters by the rule; merged, cast and checked finite."""
        replies = list(replies)
        records = [m.content[ARRAYS_KEY] for m in replies]
        weights = [float(m.content[METRICS_KEY][NUM_EXAMPLES]) for m in replies]
        if self.own_buffers and self._global is not None:
            buffers = {k: self._global[k].numpy() for k in self._buffers}
        else:
            buffers = self._aggregate_buffers(records, weights)
        for msg, record in zip(replies, records, strict=True):
            # The replies are ours once checked: the rule sees parameters only.
            msg.content[ARRAYS_KEY] = ArrayRecord({k: record[k] for k in self._params})
        params, metrics = self.strategy.aggregate_train(server_round, replies)
        if params is None:
            return _refuse(server_round, f"strategy '{self.rule.name}' returned no model")
        merged = {}
        for key, (_, dtype) in self._expected.items():
            value = buffers[key] if key in buffers else params[key].numpy()
            merged[key] = _cast(value, np.dtype(dtype))
        bad = [k for k, v in merged.items() if not np.isfinite(v).all()]
        if bad:
            return _refuse(server_round, f"strategy '{self.rule.name}' produced NaN or Inf "
                           f"in {len(bad)} arrays (first: '{bad[0]}')")
        return ArrayRecord({k: Array(v) for k, v in merged.items()}), metrics

    def state(self) -> dict[str, Any]:
        """The rule's server-optimizer state as checkpoint values ({}: none)."""
        return optimizer_state(self.strategy, self.rule.name, self._params)

    def load_state(self, state: Mapping[str, Any], source: Path | str) -> None:
        """Restore a checkpoint's optimizer state; CheckpointError if it does not fit."""
        shapes = {k: self._expected[k][0] for k in self._params}
        load_optimizer_state(self.strategy, self.rule.name, shapes, state, source)

    def _aggregate_buffers(self, records: list[ArrayRecord],
                           weights: list[float]) -> dict[str, np.ndarray]:
        """Buffers of the replies: weighted mean, or median under a robust rule."""
        if self.rule.robust:
            return {k: np.median(np.stack([r[k].numpy() for r in records]), axis=0)
                    for k in self._buffers}
        # FedAvg's arithmetic (Flower's aggregate_arrayrecords), so fedavg is unchanged.
        total = sum(weights)
        shares = [n / total for n in weights]
        out: dict[str, np.ndarray] = {}
        for record, share in zip(records, shares, strict=True):
            for key in self._buffers:
                value = record[key].numpy() * share
                out[key] = value if key not in out else out[key] + value
        return out


def _refuse(server_round: int, reason: str) -> tuple[None, None]:
    """Keep the previous global model, saying why."""
    log(WARNING, "round %d: %s; keeping the previous global model", server_round, reason)
    return None, None


def _cast(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast an aggregate back to the model's dtype (integer counters are rounded)."""
    value = np.asarray(value)
    if np.issubdtype(dtype, np.integer):
        value = np.rint(value)
    return np.asarray(value.astype(dtype, copy=False))  # 0-d stays an array
