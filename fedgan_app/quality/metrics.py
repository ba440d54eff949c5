"""Sample quality of a generator, measured in a small MNIST-style classifier.

No Inception weights are available offline, and Inception features are the
wrong lens for 28x28 digits anyway. As TF-GAN's classifier metrics, MD-GAN and
DP-FedAvg-GAN do for MNIST-like data, a small CNN classifier trained on the
server's held-out split is the feature extractor:

- ``fid``: Frechet distance between real and generated penultimate-layer
  features, computed through torchmetrics' ``FrechetInceptionDistance`` with
  the classifier as its ``feature`` module.
- ``classifier-score``: ``exp(E_x KL(p(y|x) || p(y)))``, the Inception-score
  analogue (about the number of classes for sharp, balanced samples; 1 for
  one class).
- ``class-coverage``: how many classes the generator produces, counting only
  confidently classified samples.
- ``precision`` / ``recall``: the k-NN manifold estimator of Kynkaanniemi et
  al. (2019) in the same feature space; ``density`` / ``coverage``: Naeem et
  al.'s (2020) fix for it (a collapsed generator inside one real outlier's big
  k-NN ball scores high precision but low density and coverage). All four
  come from the authors' ``prdc`` package.
- conditional generators: ``conditional-accuracy`` (the share of images
  generated for class c that the evaluator calls c), overall and per class,
  and a per-class fid.

Pure torch: no Flower I/O, no files, no logging.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

FEATURE_DIM = 128
# A sample counts towards class coverage only when the evaluator gives its
# top class at least this probability.
CONFIDENCE_THRESHOLD = 0.9
# A class is covered when its confident samples reach this fraction of the
# fair share (all samples / num_classes).
MIN_FAIR_SHARE = 0.5
# Images per forward pass / rows per distance block: bounds memory, not results.
BATCH_SIZE = 500
QUALITY_KEYS = ("fid", "classifier-score", "class-coverage", "precision", "recall",
                "density", "coverage")
NEAREST_K = 5  # k of the k-NN manifold metrics (prdc's and the papers' default)
# Everything that defines the evaluator besides its data: part of its cache key,
# so changing any of it retrains the evaluator instead of reusing a stale one.
# Bump "architecture" whenever Evaluator's layers change.
EVALUATOR_RECIPE = {
    "architecture": "conv32-pool-conv64-pool-fc128(pre-relu features)-dropout0.3-fc",
    "epochs": 30,
    "optimizer": "adam",
    "lr": 1e-3,
    "batch-size": 64,
    "max-shift": 2,
    "holdout-fraction": 0.2,
}


class Evaluator(nn.Module):
    """Small CNN classifier; input (N,C,H,W) float in [-1,1] (C in {1,3}, H=W in {28,32})."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        """Build two conv blocks and a two-layer head for ``image_size`` inputs."""
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        if image_size % 4 != 0 or image_size < 8:
            raise ValueError(f"image_size must be a multiple of 4 (>= 8), got {image_size}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            # 32 x (H/2) x (W/2)
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            # 64 x (H/4) x (W/4)
            nn.Flatten(),
            nn.Linear(64 * (image_size // 4) ** 2, FEATURE_DIM),
            # FEATURE_DIM: the features the metrics use, taken before the ReLU. After
            # it, off-manifold inputs (blank or noise images) collapse onto a few
            # points near 0 that real outliers' k-NN balls cover.
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.3), nn.Linear(FEATURE_DIM, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits (N, num_classes)."""
        return self.head(self.body(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return penultimate-layer features (N, FEATURE_DIM), pre-activation."""
        return self.body(x)

    def constructor_args(self) -> dict[str, int]:
        """Return the arguments that rebuild this architecture."""
        return {
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
        }


class FidFeatureAdapter(nn.Module):
    """Feature module for torchmetrics FID: uint8 (N,C,H,W) -> evaluator features (N,F) float64.

    torchmetrics hands the module uint8 images (``normalize=False``) and, when it
    has to infer the feature size, probes it with a 3x299x299 uint8 image; both
    are mapped to the evaluator's input: scaled to [-1,1], converted to grayscale
    (or repeated to 3 channels), and resized to the evaluator's size.
    """

    def __init__(self, evaluator: Evaluator) -> None:
        """Wrap ``evaluator``; ``num_features`` tells torchmetrics the feature size."""
        super().__init__()
        self.evaluator = evaluator
        self.num_features = FEATURE_DIM

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Map uint8 images of any size and 1 or 3 channels to float64 features."""
        x = images.to(next(self.evaluator.parameters()).device, torch.float32) / 127.5 - 1.0
        x = _match_channels(x, self.evaluator.in_channels)
        size = self.evaluator.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        # float64 features: the covariance sums and matrix square root stay exact enough
        # that a set against itself gives ~0.
        return self.evaluator.features(x).double()


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert (N,C,H,W) to ``channels`` channels (ITU-R 601 luma for RGB -> gray)."""
    if x.shape[1] == channels:
        return x
    if channels == 1 and x.shape[1] == 3:
        luma = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
        return (x * luma.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    if channels == 3 and x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    raise ValueError(f"cannot convert {x.shape[1]} channels to {channels}")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Quantize float images in [-1,1] to uint8 [0,255], as a saved PNG would hold them."""
    return ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels per axis, filling with background (-1)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator).tolist()
    return torch.stack(
        [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)]
    )


def _check_images(images: torch.Tensor) -> None:
    """Raise ValueError unless ``images`` is a non-empty (N,C,H,W) float tensor."""
    if images.dim() != 4 or images.shape[0] == 0 or not images.is_floating_point():
        raise ValueError(
            f"expected non-empty float images (N,C,H,W), got {images.dtype} {tuple(images.shape)}"
        )


def train_evaluator(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    seed: int,
    epochs: int = EVALUATOR_RECIPE["epochs"],
    holdout_fraction: float = EVALUATOR_RECIPE["holdout-fraction"],
) -> tuple[Evaluator, float]:
    """Train on (1-holdout) of the given split; return (eval-mode model, held-out accuracy).

    The split is the server's held-out data; the accuracy is measured on the
    ``holdout_fraction`` of it the model did not train on.

    Parameters
    ----------
    images : torch.Tensor
        (N, C, H, W) float images in [-1, 1].
    labels : torch.Tensor
        (N,) integer class labels in [0, num_classes).
    num_classes : int
        Number of classes of the dataset.
    seed : int
        Seeds the split, the initial weights, shuffling, augmentation and
        dropout; the global RNG state is left untouched.
    epochs : int
        Passes over the training part (with random shifts of up to 2 pixels).
    holdout_fraction : float
        Fraction of ``images`` kept out of training to measure accuracy.

    Returns
    -------
    tuple[Evaluator, float]
        The model in eval mode and its accuracy on the held-out part.

    """
    _check_images(images)
    if labels.shape != (images.shape[0],):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match {images.shape[0]} images"
        )
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    n_holdout = max(1, round(images.shape[0] * holdout_fraction))
    if n_holdout >= images.shape[0]:
        raise ValueError("too few images to keep a held-out part")
    labels = labels.long()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(images.shape[0], generator=generator)
    test_idx, train_idx = order[:n_holdout], order[n_holdout:]
    x_train, y_train = images[train_idx].float(), labels[train_idx]
    # fork_rng: weight init and dropout draw from the global RNG; seed it without
    # disturbing the caller's stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Evaluator(images.shape[1], images.shape[-1], num_classes)
        optimizer = torch.optim.Adam(model.parameters(), lr=EVALUATOR_RECIPE["lr"])
        model.train()
        for _ in range(epochs):
            order = torch.randperm(x_train.shape[0], generator=generator)
            for batch in order.split(EVALUATOR_RECIPE["batch-size"]):
                x = _random_shift(x_train[batch], EVALUATOR_RECIPE["max-shift"], generator)
                loss = F.cross_entropy(model(x), y_train[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    model.eval()
    predictions = predict_probs(model, images[test_idx].float()).argmax(dim=1)
    accuracy = (predictions == labels[test_idx]).double().mean().item()
    return model, accuracy


@torch.no_grad()
def _batched(
    fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    device: torch.device,
) -> torch.Tensor:
    """Apply ``fn`` to ``images`` in batches on ``device``; return the results on CPU."""
    outputs = [fn(batch.to(device, torch.float32)).cpu() for batch in images.split(BATCH_SIZE)]
    return torch.cat(outputs)


def predict_probs(evaluator: Evaluator, images: torch.Tensor) -> torch.Tensor:
    """Return class probabilities (N, num_classes) as float64, in eval mode without gradients."""
    _check_images(images)
    evaluator.eval()
    device = next(evaluator.parameters()).device
    return _batched(evaluator, images, device).double().softmax(dim=1)


def extract_features(evaluator: Evaluator, images: torch.Tensor) -> torch.Tensor:
    """Return penultimate-layer features (N, F) as float64, in eval mode without gradients."""
    _check_images(images)
    evaluator.eval()
    device = next(evaluator.parameters()).device
    return _batched(evaluator.features, images, device).double()


@torch.no_grad()
def fid(evaluator: Evaluator, real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance between real and fake evaluator features, via torchmetrics FID.

    Images are float (N,C,H,W) in [-1,1]; they are quantized to uint8 (what a
    saved sample holds) and fed to ``FrechetInceptionDistance`` with the
    evaluator as its feature extractor. Needs at least 2 images per side.
    """
    _check_images(real)
    _check_images(fake)
    evaluator.eval()
    metric = FrechetInceptionDistance(feature=FidFeatureAdapter(evaluator), normalize=False)
    for batch in real.split(BATCH_SIZE):
        metric.update(to_uint8(batch), real=True)
    for batch in fake.split(BATCH_SIZE):
        metric.update(to_uint8(batch), real=False)
    # The matrix square root leaves ~1e-10 negative noise for identical sets.
    return max(float(metric.compute()), 0.0)


def classifier_score(probs: torch.Tensor) -> float:
    """Return exp(E_x[KL(p(y|x) || p(y))]) for class probabilities (N, K): in [1, K]."""
    if probs.dim() != 2 or probs.shape[0] == 0:
        raise ValueError(f"expected probabilities (N, K), got {tuple(probs.shape)}")
    p = probs.double().clamp_min(1e-12)
    marginal = p.mean(dim=0, keepdim=True)
    kl = (p * (p.log() - marginal.log())).sum(dim=1)
    return float(kl.mean().exp())


def class_coverage(
    probs: torch.Tensor,
    confidence: float = CONFIDENCE_THRESHOLD,
    min_fair_share: float = MIN_FAIR_SHARE,
) -> int:
    """Count the classes the samples cover: 0..K for class probabilities (N, K).

    A sample is confidently classified when its top probability is at least
    ``confidence`` (0.9). A class is covered when the confidently classified
    samples of that class number at least ``min_fair_share`` (0.5) times its
    fair share N / K of ALL samples, so unrecognizable samples count against
    coverage rather than being ignored.
    """
    if probs.dim() != 2 or probs.shape[0] == 0:
        raise ValueError(f"expected probabilities (N, K), got {tuple(probs.shape)}")
    n, num_classes = probs.shape
    top_prob, top_class = probs.max(dim=1)
    counts = torch.bincount(top_class[top_prob >= confidence], minlength=num_classes)
    return int((counts >= min_fair_share * n / num_classes).sum())


def manifold_metrics(
    real_feats: torch.Tensor, fake_feats: torch.Tensor, k: int = NEAREST_K
) -> dict[str, float]:
    """Precision, recall (Kynkaanniemi 2019), density and coverage (Naeem 2020) via prdc.

    Real and fake features are (N, F); each side needs more than ``k`` rows.
    """
    for name, feats in (("real", real_feats), ("fake", fake_feats)):
        if feats.dim() != 2 or feats.shape[0] <= k:
            raise ValueError(
                f"{name} features must be (N, F) with N > k={k}, got {tuple(feats.shape)}"
            )
    import joblib
    from prdc import compute_prdc  # imported here: scikit-learn is slow to import

    # prdc asks scikit-learn for 8 worker processes per distance matrix: for
    # matrices of eval-samples' size, starting them costs more than they save,
    # and they cannot start inside a worker process at all.
    with joblib.parallel_config(backend="sequential"), \
            contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        values = compute_prdc(real_feats.double().numpy(), fake_feats.double().numpy(), k)
    return {key: float(values[key]) for key in ("precision", "recall", "density", "coverage")}


@torch.no_grad()
def compute_quality(
    evaluator: Evaluator, real: torch.Tensor, fake: torch.Tensor, k: int = 5
) -> dict[str, float]:
    """Compute all quality metrics of ``fake`` against ``real`` images (N,C,H,W) in [-1,1].

    Returns
    -------
    dict[str, float]
        Exactly the keys "fid", "classifier-score", "class-coverage",
        "precision", "recall". Score and coverage describe ``fake`` alone.

    """
    fake_probs = predict_probs(evaluator, fake)
    manifold = manifold_metrics(
        extract_features(evaluator, real), extract_features(evaluator, fake), k
    )
    return {
        "fid": fid(evaluator, real, fake),
        "classifier-score": classifier_score(fake_probs),
        "class-coverage": float(class_coverage(fake_probs)),
        **manifold,
    }


@torch.no_grad()
def conditional_quality(
    evaluator: Evaluator,
    real: torch.Tensor,
    real_labels: torch.Tensor,
    fake: torch.Tensor,
    fake_labels: torch.Tensor,
) -> dict[str, float]:
    """Per-class quality of a conditional generator's images (N,C,H,W) in [-1,1].

    Returns ``conditional-accuracy`` (share of fakes the evaluator assigns to
    the class they were generated for), ``conditional-accuracy/<c>`` per
    class, and ``fid/<c>``: the fid of class c's fakes against class c's real
    images (small per-class samples make it biased upwards: compare runs with
    the same eval-samples only). A class with fewer than 2 images on either
    side gets no fid.
    """
    predicted = predict_probs(evaluator, fake).argmax(dim=1)
    hits = predicted == fake_labels.to(predicted.device)
    row = {"conditional-accuracy": hits.double().mean().item()}
    for c in range(evaluator.num_classes):
        mine = fake_labels == c
        if mine.any():
            row[f"conditional-accuracy/{c}"] = hits[mine].double().mean().item()
        real_c = real[real_labels == c]
        if mine.sum() >= 2 and real_c.size(0) >= 2:
            row[f"fid/{c}"] = fid(evaluator, real_c, fake[mine])
    return row


def format_quality(row: Mapping[str, float]) -> str:
    """Quality metrics as 'fid 12.3 classifier-score 8.1 ...'."""
    return " ".join(f"{k} {row[k]:.3g}" for k in QUALITY_KEYS if k in row)
