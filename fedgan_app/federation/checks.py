"""The checks of one reply: pure functions that say why a reply is unusable, or None.

Every value in a reply is untrusted. The order bounds the work: the
records' and metrics' shape first, then each array's metadata AND the .npy
header inside its bytes (which `Array.numpy()` would trust), its values,
then the bounded metadata codec (`fedgan_app.protocol.metadata`), then the
claims against the round and the node's partition. Reasons start with a kind
(``keys:``, ``metadata:``, ``weight:``, ...) that the round's row counts as
``dropped-<kind>``, and quote untrusted values only through `short`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from fedgan_app.federation.sampling import PartitionSampler
from fedgan_app.protocol.message import (
    ARRAYS_KEY,
    EVALUATE_METRIC_KEYS,
    METADATA_RECORD_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    TRAIN_METRIC_KEYS,
)
from fedgan_app.protocol.metadata import (
    EVAL_MAX_IMAGES,
    MetadataError,
    TrainMetadata,
    decode_metadata,
    short,
)

# A packed key -> (shape, dtype) of the model every reply must match.
Expected = dict[str, tuple[tuple[int, ...], str]]
# For 'weight-check' = partition-size: the label counts of each partition when
# the data is split into n partitions (the server's own copy of the partitioning).
Partitions = Callable[[int], Sequence[Sequence[int]]]


def expected_arrays(reference: ArrayRecord) -> Expected:
    """The keys, shapes and dtypes of the packed global model."""
    return {k: (tuple(a.shape), str(a.dtype)) for k, a in reference.items()}


def check_train_reply(msg: Message, expected: Expected, max_bytes: int,
                      num_classes: int | None,
                      server_round: int) -> tuple[TrainMetadata | None, str | None]:
    """Return (metadata, None) for a usable reply, else (metadata or None, reason)."""
    content = msg.content
    if set(content.array_records) != {ARRAYS_KEY}:
        return None, f"records: expected one ArrayRecord '{ARRAYS_KEY}'"
    if set(content.metric_records) != {METRICS_KEY}:
        return None, f"records: expected one MetricRecord '{METRICS_KEY}'"
    metrics = content.metric_records[METRICS_KEY]
    if set(metrics) != TRAIN_METRIC_KEYS:
        return None, (f"metrics: keys differ from the expected {len(TRAIN_METRIC_KEYS)} "
                      f"(unexpected: {short(sorted(set(metrics) - TRAIN_METRIC_KEYS))})")
    for key, value in metrics.items():
        if not isinstance(value, int | float) or not math.isfinite(value):
            return None, f"metrics: '{key}' is not a finite number"
    num_examples = metrics[NUM_EXAMPLES]
    if num_examples <= 0:
        return None, f"metrics: {NUM_EXAMPLES} must be > 0, got {short(num_examples)}"
    reason = check_arrays(content.array_records[ARRAYS_KEY], expected)
    if reason is not None:
        return None, reason
    try:
        meta = decode_metadata(content.config_records.get(METADATA_RECORD_KEY), max_bytes,
                               num_classes)
    except MetadataError as exc:
        return None, f"metadata: {exc}"
    if meta.num_examples != num_examples:
        return meta, (f"metadata: num_examples {meta.num_examples} != "
                      f"{NUM_EXAMPLES} metric {short(num_examples)}")
    if meta.server_round != server_round:
        return meta, (f"round: the reply is for round {meta.server_round}, this is "
                      f"round {server_round}")
    return meta, None


def check_claim(node: int, meta: TrainMetadata, sampler: PartitionSampler,
                partitions: Partitions) -> str | None:
    """Why a reply's claims do not match its node's partition (None: they do).

    With 'weight-check' = partition-size the server knows each partition's
    label counts: a claim of more (or other) examples than the node's
    partition holds would buy a larger share of the average.
    """
    claim = sampler.claims.get(node)
    if claim is None:
        why = sampler.refused.get(node, "it did not answer the partition query")
        return f"partition: node {node} has no partition of its own ({why})"
    if meta.partition_id != claim:
        return (f"partition: the reply is for partition {meta.partition_id}, node {node} "
                f"holds partition {claim}")
    assert sampler.num_partitions is not None  # set with the first claim
    counts = list(partitions(sampler.num_partitions)[claim])
    if meta.num_examples != sum(counts):
        return (f"weight: claims {meta.num_examples} examples, partition {claim} holds "
                f"{sum(counts)}")
    if meta.label_histogram != counts:
        return f"weight: the label counts differ from partition {claim}'s"
    return None


def check_arrays(arrays: ArrayRecord, expected: Expected) -> str | None:
    """Reason the arrays do not fit the model, or None when they do."""
    keys = set(arrays)
    if keys != set(expected):
        missing = sorted(set(expected) - keys)[:3]
        extra = sorted(keys - set(expected))[:3]
        return f"keys: missing {short(missing)}, unexpected {short(extra)}"
    for key, (shape, dtype) in expected.items():
        array = arrays[key]
        if tuple(array.shape) != shape:
            return f"shape: '{key}' is {short(tuple(array.shape))}, expected {shape}"
        if str(array.dtype) != dtype:
            return f"dtype: '{key}' is {short(array.dtype)}, expected {dtype}"
        reason = npy_reason(array, shape, np.dtype(dtype))
        if reason is not None:
            return f"data: '{key}' {reason}"
        if not np.isfinite(array.numpy()).all():
            return f"non-finite: '{key}' has NaN or Inf"
    return None


def npy_reason(array: Array, shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    """Why an Array's bytes are not the .npy of `shape` and `dtype` (None: they are).

    An Array's shape and dtype are metadata beside its bytes; `numpy()` trusts
    the .npy header inside the bytes, which could declare a far larger array.
    The header is read first, so decoding costs what the bytes hold.
    """
    if array.stype != "numpy.ndarray":
        return f"is serialized as {short(array.stype)}, not numpy.ndarray"
    data = io.BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(data)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            return f"is in .npy format {short(version)}"
        header_shape, _, header_dtype = read_header(data)
    except ValueError as exc:
        return f"has no valid .npy header ({short(str(exc))})"
    if tuple(header_shape) != shape or header_dtype != dtype:
        return (f"holds {short(tuple(header_shape))} {short(str(header_dtype))} while its "
                f"metadata says {shape} {dtype}")
    expected = data.tell() + math.prod(shape) * dtype.itemsize
    if len(array.data) != expected:
        return f"has {len(array.data)} bytes, expected {expected}"
    return None


def valid_evaluate_reply(msg: Message) -> bool:
    """Whether an evaluate reply holds num-examples in 1..EVAL_MAX_IMAGES and an accuracy.

    The bound keeps one client's claim from outweighing the others' in the average.
    """
    records = msg.content.metric_records
    metrics = records.get(METRICS_KEY) if len(records) == 1 else None
    return (
        metrics is not None
        and set(metrics) == EVALUATE_METRIC_KEYS
        and all(isinstance(v, int | float) and math.isfinite(v) and v >= 0
                for v in metrics.values())
        and 0 < metrics[NUM_EXAMPLES] <= EVAL_MAX_IMAGES
    )


def update_norm(arrays: ArrayRecord, global_arrays: dict[str, np.ndarray]) -> float:
    """L2 norm of (client - global) over floating-point arrays."""
    total = 0.0
    for key, array in arrays.items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating):
            diff = values.astype(np.float64) - global_arrays[key].astype(np.float64)
            total += float(np.square(diff).sum())
    return math.sqrt(total)
