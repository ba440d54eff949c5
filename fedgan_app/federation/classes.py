"""Class-aware aggregation (class-aware on, or auto): each class's rows weighted by its counts.

A conditional GAN has parameters that belong to one class: the rows of G's
first layer that the label's one-hot code selects, the rows of G's conditional
BatchNorm embeddings (g-conditioning 'batchnorm'), and the rows of D's class
embedding (projection) or of ACGAN's class head. A client trains a class's
rows only when it holds that class, so FedAvg's data-size weights dilute a
class that few clients hold by everyone else's unchanged rows. Here each
class's rows are averaged over the replies weighted by each client's count of
that class (its label histogram, checked against its partition by the reply
screen); a class no reply holds keeps the rows the rule aggregated.
Everything else is aggregated by the layers below, as without it.

`ClassAware` sits between the quorum and the buffer split: it sees the
replies the rule averages, with the weights the layers above left them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy

from fedgan_app.federation.report import RoundReport
from fedgan_app.federation.wrapper import Wrapper
from fedgan_app.protocol.message import ARRAYS_KEY, D_PREFIX, G_PREFIX

# G's first layer: a conditional G's input is z followed by the one-hot class code.
G_INPUT_KEY = G_PREFIX + "net.0.weight"
# G's conditional BatchNorm layers: one (gain, bias) row per class.
G_CLASS_SUFFIX = ".embed.weight"
# D's per-class layers: the projection embedding, ACGAN's class head (with or
# without spectral norm's parametrization).
D_CLASS_LAYERS = (D_PREFIX + "embed.", D_PREFIX + "aux.")


def class_rows(reference: ArrayRecord, num_classes: int, latent_dim: int,
               buffers: frozenset[str]) -> dict[str, slice]:
    """Packed key -> the rows (along the first axis) that belong to the classes 0..C-1.

    G's first layer has `latent_dim` rows for z, then one per class when the
    GAN is conditional; G's conditional BatchNorm embeddings and D's class
    layers have one row per class.

    Raises
    ------
    ValueError
        When the model has no class rows (an unconditional GAN).

    """
    rows: dict[str, slice] = {}
    for key, array in reference.items():
        shape = tuple(array.shape)
        if key in buffers or not shape:
            continue
        if key == G_INPUT_KEY and num_classes and shape[0] == latent_dim + num_classes:
            rows[key] = slice(latent_dim, latent_dim + num_classes)
        elif _per_class_layer(key) and shape[0] == num_classes:
            rows[key] = slice(0, num_classes)
    if G_INPUT_KEY not in rows:
        raise ValueError("class-aware aggregation needs a conditional GAN: the model has no "
                         "class rows (set conditional = true)")
    return rows


def _per_class_layer(key: str) -> bool:
    """Whether a packed key is a layer with one row per class (G's or D's)."""
    return key.startswith(D_CLASS_LAYERS) or (key.startswith(G_PREFIX)
                                              and key.endswith(G_CLASS_SUFFIX))


def per_class_average(rows: list[np.ndarray], counts: list[list[int]],
                      aggregated: np.ndarray) -> np.ndarray:
    """Each class's row averaged over the replies by their counts of it.

    Parameters
    ----------
    rows : list[np.ndarray]
        Each reply's class rows, (C, ...) each.
    counts : list[list[int]]
        Each reply's examples per class (its label histogram).
    aggregated : np.ndarray
        The rows as the rule aggregated them: kept for a class no reply holds.

    Returns
    -------
    np.ndarray
        (C, ...), in the dtype of `aggregated`.

    """
    weights = np.asarray(counts, dtype=np.float64)  # (replies, C)
    totals = weights.sum(axis=0)  # (C,)
    stacked = np.stack([r.astype(np.float64) for r in rows])  # (replies, C, ...)
    shares = np.divide(weights, totals, out=np.zeros_like(weights), where=totals > 0)
    mixed = np.einsum("rc,rc...->c...", shares, stacked)
    held = (totals > 0).reshape((-1,) + (1,) * (stacked.ndim - 2))
    return np.where(held, mixed, aggregated).astype(aggregated.dtype)


class ClassAware(Wrapper):
    """Replace the class rows of the rule's aggregate by their per-class weighted average.

    Parameters
    ----------
    strategy : Strategy
        The layers below (the buffer split and the rule).
    rows : Mapping[str, slice]
        `class_rows` of the model.
    report : RoundReport
        Holds each accepted reply's label histogram (`class_counts`, filled by
        the reply screen).

    """

    def __init__(self, strategy: Strategy, rows: Mapping[str, slice],
                 report: RoundReport) -> None:
        super().__init__(strategy)
        self.rows = dict(rows)
        self.report = report

    def summary(self) -> None:
        """Log the class rows, then the layers below."""
        log(INFO, "\t├──> class-aware: the rows of %s weighted by each client's count of "
            "their class", ", ".join(sorted(self.rows)))
        self.strategy.summary()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate below, then average each class's rows by the replies' counts of it."""
        replies = list(replies)
        # The class rows first: the layers below may take arrays out of the replies.
        counts = [list(self.report.class_counts[id(msg)]) for msg in replies]
        replies_rows = {key: [msg.content[ARRAYS_KEY][key].numpy()[rows].copy()
                              for msg in replies] for key, rows in self.rows.items()}
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None or not replies:
            return arrays, metrics
        merged = dict(arrays.items())
        for key, rows in self.rows.items():
            aggregated = arrays[key].numpy()
            updated = aggregated.copy()
            updated[rows] = per_class_average(replies_rows[key], counts, aggregated[rows])
            merged[key] = Array(updated)
        return ArrayRecord(merged), metrics
