"""The shape every layer of the server's strategy has: a Strategy around another.

Flower's differential-privacy wrappers hold the strategy they wrap as
``self.strategy`` and delegate what they do not change; each layer here does
the same (`Wrapper`), and overrides only the steps of its one concern. The
layers pass the server optimizer's state (`state`, `load_state`) down to the
one that holds Flower's strategy (`fedgan_app.federation.buffers`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

Layer = TypeVar("Layer", bound=Strategy)


class Wrapper(Strategy):
    """A strategy that delegates every step to `self.strategy` unless it overrides it."""

    def __init__(self, strategy: Strategy) -> None:
        super().__init__()
        self.strategy = strategy

    def summary(self) -> None:
        """Log the wrapped strategy's settings."""
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's train messages."""
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped strategy's aggregate."""
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's evaluate messages."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The wrapped strategy's evaluation metrics."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    def state(self) -> dict[str, Any]:
        """The server optimizer's state as checkpoint values ({}: none)."""
        return self.strategy.state() if isinstance(self.strategy, Wrapper) else {}

    def load_state(self, state: Mapping[str, Any], source: Path | str) -> None:
        """Restore a checkpoint's server optimizer state (see `state`)."""
        if isinstance(self.strategy, Wrapper):
            self.strategy.load_state(state, source)


def find_layer(strategy: Strategy, kind: type[Layer]) -> Layer:
    """The first layer of type `kind` in a stack of wrappers (LookupError: none)."""
    layer: Strategy | None = strategy
    while layer is not None:
        if isinstance(layer, kind):
            return layer
        layer = getattr(layer, "strategy", None)
    raise LookupError(f"no {kind.__name__} in the strategy")
