"""The server's judge of sample quality, and the constants benchmarks must share.

`QualityJudge` scores a generator the way the ServerApp does: `eval_samples`
images from a fixed noise stream (and, for a conditional G, balanced labels
0, 1, ..., C-1, 0, ...) against the server's held-out split, in the cached
evaluator classifier (fedgan_app.quality.evaluator). The noise streams, the
grid size and the evaluator's cache key live here, so a benchmark that
imports them scores exactly as the app does; so does `make_grid`, which tiles
images into the grids a run writes (samples/round_NNNN.png). The metrics themselves are the
pure functions of fedgan_app.quality.metrics.

Every generator the server samples is built by `generator_from`, which
recomputes G's BatchNorm statistics from noise for its current weights
(`models.recalibrate_batchnorm`): averaged client statistics belong to the
clients' pre-average weights, an EMA generator has none of its own, and with
batchnorm='local' the clients keep theirs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.common.logger import log

from fedgan_app.data.prepared import cache_root, load_train_pool
from fedgan_app.data.spec import ImageData, PartitionSpec
from fedgan_app.gan.models import GANConfig, Generator, recalibrate_batchnorm
from fedgan_app.gan.training import derive_seed, sample_images
from fedgan_app.protocol.message import G_PREFIX
from fedgan_app.quality.evaluator import load_or_train_evaluator
from fedgan_app.quality.metrics import (
    Evaluator,
    compute_quality,
    conditional_quality,
    format_quality,
)

GRID_IMAGES = 64  # the fixed-noise sample grid: 8 x 8
GRID_COLUMNS = 8
GRID_NOISE_STREAM = 0  # derive_seed(seed, stream) seeds each noise stream
EVAL_NOISE_STREAM = 1
BATCHNORM_NOISE_STREAM = 2  # the noise that recomputes G's BatchNorm statistics
EVAL_BATCH = 500  # images generated per forward pass when scoring
CLASS_GRID_COLUMNS = 8  # per-class grid: one row per class, the same 8 noises per row


def grid_noise(seed: int, latent_dim: int, scale: float = 1.0) -> torch.Tensor:
    """The fixed noise of the sample grids: one batch for every round of a run.

    `scale` is the noise's standard deviation (the 'sample-noise-scale' setting).
    """
    rng = torch.Generator().manual_seed(derive_seed(seed, GRID_NOISE_STREAM))
    return torch.randn(GRID_IMAGES, latent_dim, generator=rng) * scale


def balanced_labels(n: int, num_classes: int, start: int = 0) -> torch.Tensor | None:
    """Labels start, start+1, ... modulo C for a conditional G (None when unconditional)."""
    if num_classes == 0:
        return None
    return torch.arange(start, start + n) % num_classes


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into one uint8 RGB image (H', W', 3).

    Same geometry as ``torchvision.utils.make_grid`` (which does not import here):
    ``min(nrow, N)`` columns, ``padding`` black pixels around and between tiles.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1|3, H, W), got {tuple(images.shape)}")
    if nrow < 1 or padding < 0:
        raise ValueError(f"need nrow >= 1 and padding >= 0, got {nrow=}, {padding=}")
    imgs = images.detach().to("cpu", torch.float32)
    if imgs.shape[1] == 1:
        imgs = imgs.expand(-1, 3, -1, -1)  # grayscale -> RGB so every grid is (H, W, 3)
    # [-1, 1] (tanh output) -> [0, 255]; clamp so overshoot cannot wrap around in uint8
    pixels = ((imgs.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    n, _, h, w = pixels.shape
    ncols = min(nrow, n)
    nrows = math.ceil(n / ncols)
    grid = torch.zeros(
        (nrows * (h + padding) + padding, ncols * (w + padding) + padding, 3),
        dtype=torch.uint8,
    )
    for i in range(n):
        top = (i // ncols) * (h + padding) + padding
        left = (i % ncols) * (w + padding) + padding
        grid[top : top + h, left : left + w] = pixels[i].permute(1, 2, 0)  # CHW -> HWC
    return grid.numpy()


def sample_grid(generator: Generator, noise: torch.Tensor,
                device: torch.device) -> np.ndarray:
    """G's images of the fixed noise as one uint8 (H, W, 3) grid (labels 0..C-1, 0, ...)."""
    labels = balanced_labels(noise.size(0), generator.num_classes)
    return make_grid(sample_images(generator, noise, device, labels), nrow=GRID_COLUMNS)


def class_grid(generator: Generator, noise: torch.Tensor, device: torch.device) -> np.ndarray:
    """A conditional G's per-class grid: row c holds class c, one noise per column."""
    columns = noise[:CLASS_GRID_COLUMNS]
    classes = generator.num_classes
    z = columns.repeat(classes, 1)
    labels = torch.arange(classes).repeat_interleave(columns.size(0))
    return make_grid(sample_images(generator, z, device, labels), nrow=columns.size(0))


def generate_eval_images(generator: Generator, num_images: int, latent_dim: int,
                         seed: int, device: torch.device) -> torch.Tensor:
    """The images a quality evaluation scores: the run's evaluation noise stream."""
    return generate_eval_batch(generator, num_images, latent_dim, seed, device)[0]


def generate_eval_batch(
    generator: Generator, num_images: int, latent_dim: int, seed: int, device: torch.device,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, labels) of a quality evaluation; labels are None for an unconditional G.

    The noise is N(0, scale^2): `scale` is the 'sample-noise-scale' setting.
    """
    rng = torch.Generator().manual_seed(derive_seed(seed, EVAL_NOISE_STREAM))
    fakes = []
    for start in range(0, num_images, EVAL_BATCH):
        z = scale * torch.randn(min(EVAL_BATCH, num_images - start), latent_dim,
                                generator=rng)
        labels = balanced_labels(z.size(0), generator.num_classes, start)
        fakes.append(sample_images(generator, z, device, labels))
    labels = balanced_labels(num_images, generator.num_classes)
    return torch.cat(fakes), labels


def generator_from(arrays: ArrayRecord | Mapping[str, torch.Tensor], gan_cfg: GANConfig,
                   device: torch.device, seed: int = 0) -> Generator:
    """Build G from packed arrays; its BatchNorm statistics recomputed from noise.

    `arrays` is an ArrayRecord or a packed state_dict (``generator.*`` keys;
    ``discriminator.*`` keys, if any, are ignored). `seed` picks the noise of
    the statistics, so the same weights always give the same samples.
    """
    state = arrays.to_torch_state_dict() if isinstance(arrays, ArrayRecord) else arrays
    generator = Generator(gan_cfg)
    g_state = {k[len(G_PREFIX):]: v for k, v in state.items() if k.startswith(G_PREFIX)}
    generator.load_state_dict(g_state)
    generator = generator.to(device)
    recalibrate_batchnorm(generator, seed=derive_seed(seed, BATCHNORM_NOISE_STREAM),
                          device=device)
    return generator


def update_ema(ema: Mapping[str, torch.Tensor] | None,
               arrays: ArrayRecord | Mapping[str, torch.Tensor],
               decay: float) -> dict[str, torch.Tensor]:
    """One round of the server-side EMA of the global generator (packed G keys).

    ema <- decay * ema + (1 - decay) * G for floating-point entries; the first
    call starts the average at G. Integer buffers are copied. The EMA's
    BatchNorm statistics are recomputed whenever it is sampled.
    """
    state = arrays.to_torch_state_dict() if isinstance(arrays, ArrayRecord) else arrays
    current = {k: v.detach().cpu() for k, v in state.items() if k.startswith(G_PREFIX)}
    if ema is None:
        return {k: v.clone() for k, v in current.items()}
    out = {}
    for key, value in current.items():
        old = ema.get(key)
        if old is None or not value.is_floating_point() or old.shape != value.shape:
            out[key] = value.clone()
        else:
            out[key] = old.to(value.dtype) * decay + value * (1.0 - decay)
    return out


def evaluator_cache_key(dataset: str, seed: int, num_server_images: int) -> str:
    """What defines the evaluator of a run: dataset, server split, seed."""
    return f"{dataset}|server-split|seed={seed}|n={num_server_images}"


def evaluator_cache_dir() -> Path:
    """Where evaluator classifiers are cached: $FEDGAN_CACHE_DIR or ~/.cache/fedgan."""
    return cache_root() / "evaluator"


class QualityJudge:
    """Scores generators against the server's held-out split, as the ServerApp does.

    Parameters
    ----------
    dataset : str
        The run's 'dataset' setting (part of the evaluator's cache key).
    seed : int
        The run's seed: the evaluator's training and the evaluation noise.
    eval_samples : int
        Generated (and real) images per evaluation.
    server_data : ImageData
        The server's held-out split.
    spec : PartitionSpec
        The run's partitioning; its training pool gives the reference row.
    on_reference : Callable[[dict[str, float]], None] | None
        Called once, when the evaluator is first loaded, with the reference
        row (real held-out vs real training images, and the evaluator's
        held-out accuracy): the floor of fid, the ceiling of the others.
    noise_scale : float
        Standard deviation of the scored images' noise ('sample-noise-scale').

    """

    def __init__(self, dataset: str, seed: int, eval_samples: int, server_data: ImageData,
                 spec: PartitionSpec,
                 on_reference: Callable[[dict[str, float]], None] | None = None,
                 noise_scale: float = 1.0) -> None:
        """Keep the data and settings; the evaluator is loaded when first needed."""
        self.dataset = dataset
        self.seed = seed
        self.eval_samples = eval_samples
        self.server_data = server_data
        self.spec = spec
        self.on_reference = on_reference
        self.noise_scale = noise_scale
        self.evaluator_accuracy: float | None = None  # held-out, once loaded
        self._evaluator: Evaluator | None = None

    def evaluator(self) -> Evaluator:
        """Load (or train once and cache) the evaluator; report the reference row."""
        if self._evaluator is None:
            data = self.server_data
            key = evaluator_cache_key(self.dataset, self.seed, len(data))
            self._evaluator, self.evaluator_accuracy, trained = load_or_train_evaluator(
                evaluator_cache_dir(), key, data.images, data.labels, data.num_classes,
                self.seed)
            log(INFO, "evaluator classifier %s: held-out accuracy %.3f",
                "trained" if trained else "loaded from cache", self.evaluator_accuracy)
            reference = self.reference_row()
            log(INFO, "reference (real held-out vs real train): %s",
                format_quality(reference))
            if self.on_reference is not None:
                self.on_reference(reference)
        return self._evaluator

    def reference_row(self) -> dict[str, float]:
        """Metrics of real held-out images vs a seeded subset of real training images."""
        evaluator = self.evaluator()
        pool = load_train_pool(self.spec)
        n = min(self.eval_samples, len(pool), len(self.server_data))
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(self.seed))
        quality = compute_quality(evaluator, self.server_data.images[:n],
                                  pool.images[order[:n]])
        return {"evaluator-accuracy": float(self.evaluator_accuracy), **quality}

    def evaluate(self, generator: Generator, device: torch.device) -> dict[str, float]:
        """Score `eval_samples` images of G; adds `eval-time-s` (seconds it took).

        A conditional G is also scored per class (conditional-accuracy, overall
        and per class, and a per-class fid).
        """
        start = time.perf_counter()
        evaluator = self.evaluator()
        fakes, labels = generate_eval_batch(generator, self.eval_samples,
                                            generator.latent_dim, self.seed, device,
                                            self.noise_scale)
        real = self.server_data.images[: self.eval_samples]
        quality = compute_quality(evaluator, real, fakes)
        if labels is not None:
            quality.update(conditional_quality(
                evaluator, real, self.server_data.labels[: self.eval_samples], fakes, labels))
        return {**quality, "eval-time-s": time.perf_counter() - start}
