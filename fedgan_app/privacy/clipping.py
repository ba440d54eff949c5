"""Clipping a client's update of the parameters: G's and D's together, buffers apart.

Differential privacy bounds what one client can move: the update of every
parameter of both networks, as one vector, has L2 norm at most C (G's update
is computed through a D trained on the client's images, so both carry
them). Buffers (BatchNorm statistics and counters, spectral-norm vectors)
are not part of the update: under DP the server never takes them from a
client (`fedgan_app.federation.buffers`). Flower's ``fixedclipping_mod``
would clip the whole record, integer counters included; this clips the
parameters only, with Flower's own arithmetic (``get_norm``,
``clip_inputs_inplace``).
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.supercore.differential_privacy import clip_inputs_inplace, get_norm

# Relative slack when the server checks a client's clipping: float32 rounding
# of a clipped update can leave its norm a hair above C.
CLIP_TOLERANCE = 1e-4


def parameter_update(record: ArrayRecord, reference: ArrayRecord,
                     buffers: Collection[str]) -> dict[str, np.ndarray]:
    """The update of every parameter (buffers left out), float64, in record order."""
    return {key: record[key].numpy().astype(np.float64) - reference[key].numpy()
            for key in record.keys() if key not in buffers}


def update_norm_of(record: ArrayRecord, reference: ArrayRecord,
                   buffers: Collection[str]) -> float:
    """L2 norm of the parameters' update, as one vector."""
    return get_norm(list(parameter_update(record, reference, buffers).values()))


def clip_update(record: ArrayRecord, reference: ArrayRecord, buffers: Collection[str],
                clipping_norm: float) -> tuple[ArrayRecord, float]:
    """The record with its parameters' update clipped to `clipping_norm`; the norm before.

    Buffers are copied as they are; every array keeps its key, order and dtype.
    """
    update = parameter_update(record, reference, buffers)
    norm = get_norm(list(update.values()))
    values = list(update.values())
    if norm > clipping_norm:  # (Flower's division would fail on a zero update)
        clip_inputs_inplace(values, clipping_norm)
    clipped = dict(zip(update, values, strict=True))
    out = {}
    for key in record.keys():
        array = record[key].numpy()
        if key in clipped:
            array = (reference[key].numpy() + clipped[key]).astype(array.dtype)
        out[key] = Array(np.asarray(array))
    return ArrayRecord(out), norm
