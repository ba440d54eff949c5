"""Sample any fedgan checkpoint without Flower: ``python -m fedgan_app.sample``.

::

    python -m fedgan_app.sample CHECKPOINT --num 64 [--class C] [--seed S]
                                [--ema | --raw] --out grid.png

G is rebuilt from the checkpoint alone: its settings come from the run's own
config stored in the checkpoint, and the image shape and number of classes
from the shapes of G's weights (no data is loaded). Its BatchNorm statistics
are recomputed from noise, as the server does before it samples
(`fedgan_app.quality.judge.generator_from`). The server-side EMA generator is
sampled when the checkpoint holds one (``--raw`` picks the raw global G).

With the defaults (64 images, the run's seed) the grid is the one the run
drew for the checkpoint's round (``samples/round_NNNN.png``): the same noise,
the same labels 0, 1, ..., C-1, 0, ... for a conditional G. ``--seed`` draws
other noise; ``--class C`` draws every image of class C (conditional runs).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedgan_app.config import RunConfig
from fedgan_app.files import atomic_write
from fedgan_app.gan.models import (
    GANConfig,
    Generator,
    ModelShapeError,
    gan_config,
    pick_device,
)
from fedgan_app.gan.training import derive_seed, sample_images
from fedgan_app.outputs.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from fedgan_app.outputs.runfolder import CHECKPOINTS_DIR, LATEST_CHECKPOINT
from fedgan_app.protocol.message import G_PREFIX
from fedgan_app.quality.judge import (
    GRID_COLUMNS,
    GRID_NOISE_STREAM,
    balanced_labels,
    generator_from,
    make_grid,
)
from fedgan_app.settings import SETTINGS_BY_KEY, ConfigError

# The image sizes the DCGAN can be built for (models.GANConfig): the candidates
# tried against a checkpoint's weights.
_IMAGE_SIZES = range(8, 65, 4)
MAX_IMAGES = 10_000


class SampleError(ValueError):
    """A checkpoint or an option the sampler cannot use; the message names it."""


@dataclass(frozen=True)
class Samples:
    """Images drawn from a checkpoint, and what they were drawn from."""

    images: torch.Tensor  # (N, C, H, W) in [-1, 1]
    labels: torch.Tensor | None  # (N,) for a conditional G
    server_round: int
    generator: str  # "ema" or "raw"


def sample_checkpoint(
    path: Path | str,
    num: int = 64,
    class_id: int | None = None,
    seed: int | None = None,
    ema: bool | None = None,
    device: str = "cpu",
) -> Samples:
    """Draw `num` images from a checkpoint's generator.

    Parameters
    ----------
    path : Path | str
        A fedgan checkpoint (``checkpoints/latest.pt``, ``best.pt``).
    num : int
        Images to draw, 1 to ``MAX_IMAGES``.
    class_id : int | None
        Draw every image of this class (conditional runs only); None: labels
        0, 1, ..., C-1, 0, ... like the run's grids.
    seed : int | None
        Seed of the noise; None: the run's seed, i.e. the run's grid noise.
    ema : bool | None
        True: the EMA generator (an error when the checkpoint has none);
        False: the raw global generator; None: the EMA one when present.
    device : str
        'auto', 'cpu' or 'cuda'.

    Returns
    -------
    Samples
        The images, their labels and what they were drawn from.

    Raises
    ------
    CheckpointError
        When the file is missing, truncated or not a fedgan checkpoint.
    SampleError
        When an option does not fit the checkpoint (``--ema`` without an EMA,
        ``--class`` on an unconditional run or out of range) or its generator
        does not fit its own config.

    """
    path = Path(path)
    if not 1 <= num <= MAX_IMAGES:
        raise SampleError(f"--num must be between 1 and {MAX_IMAGES}, got {num}")
    checkpoint = load_checkpoint(path)
    cfg = checkpoint_run_config(checkpoint, path)
    which, state = _pick_generator(checkpoint, path, ema)
    gan_cfg = checkpoint_gan_config(state, cfg, path)
    labels = _labels(num, class_id, gan_cfg, cfg, path)
    torch_device = _device(device)
    # The run's seed for the BatchNorm statistics: the very G the server sampled.
    generator = generator_from(state, gan_cfg, torch_device, cfg.seed)
    rng = torch.Generator().manual_seed(
        derive_seed(cfg.seed if seed is None else seed, GRID_NOISE_STREAM))
    noise = torch.randn(num, gan_cfg.latent_dim, generator=rng) * cfg.sample_noise_scale
    with torch.no_grad():
        images = sample_images(generator, noise, torch_device, labels)
    return Samples(images, labels, checkpoint.server_round, which)


def write_grid(images: torch.Tensor, out: Path, columns: int = GRID_COLUMNS) -> np.ndarray:
    """Tile `images` into a grid and write it to `out` atomically (PNG, or by suffix)."""
    from PIL import Image  # only the CLI writes images

    grid = make_grid(images, nrow=columns)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(out, lambda tmp: Image.fromarray(grid).save(tmp))
    except ValueError as exc:  # Pillow: unknown file extension
        raise SampleError(f"--out {out}: cannot write an image there ({exc})") from exc
    return grid


def checkpoint_run_config(checkpoint: Checkpoint, path: Path) -> RunConfig:
    """The run's settings stored in the checkpoint (keys this fedgan does not know dropped)."""
    known = {k: v for k, v in checkpoint.config.items() if k in SETTINGS_BY_KEY}
    try:
        return RunConfig.from_run_config(known)
    except ConfigError as exc:
        raise SampleError(f"checkpoint {path} holds a config this fedgan cannot use: {exc}"
                          ) from exc


def _pick_generator(checkpoint: Checkpoint, path: Path,
                    ema: bool | None) -> tuple[str, Mapping[str, torch.Tensor]]:
    """("ema" | "raw", packed G state) as asked, the EMA one by default when present."""
    if ema and checkpoint.ema_state is None:
        raise SampleError(
            f"--ema: checkpoint {path} holds no EMA generator (its run had "
            "generator-ema = 0); sample the raw generator (leave out --ema, or --raw)"
        )
    if ema is False or checkpoint.ema_state is None:
        return "raw", checkpoint.state
    return "ema", checkpoint.ema_state


def checkpoint_gan_config(state: Mapping[str, torch.Tensor], cfg: RunConfig,
                    path: Path) -> GANConfig:
    """The GANConfig whose generator has exactly the checkpoint's G shapes.

    The run's config gives the architecture settings; the image shape and the
    number of classes are read off G's weights: its first layer takes z plus a
    one-hot class code, its last layer outputs the image channels, and the
    image size is the candidate whose G matches every shape.
    """
    shapes = {k[len(G_PREFIX):]: tuple(v.shape) for k, v in state.items()
              if k.startswith(G_PREFIX)}
    weights = [shape for shape in shapes.values() if len(shape) == 4]
    if not weights:
        raise SampleError(f"checkpoint {path} holds no generator weights")
    num_classes = weights[0][0] - cfg.latent_dim if cfg.conditional else 0
    channels = weights[-1][1]
    for size in _IMAGE_SIZES:
        try:
            candidate = gan_config(cfg, (channels, size, size), num_classes)
        except ModelShapeError:
            break  # channels or classes no DCGAN here has: no size will fit
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            built = Generator(candidate).state_dict()
        if {k: tuple(v.shape) for k, v in built.items()} == shapes:
            return candidate
    raise SampleError(
        f"checkpoint {path}: its generator does not fit the DCGAN its config describes "
        f"(latent-dim {cfg.latent_dim}, g-width {cfg.g_width}, conditional "
        f"{cfg.conditional}); was it written by another fedgan version?"
    )


def _labels(num: int, class_id: int | None, gan_cfg: GANConfig, cfg: RunConfig,
            path: Path) -> torch.Tensor | None:
    """The labels to draw: all `class_id`, or 0, 1, ..., C-1, 0, ... (None: unconditional)."""
    if class_id is None:
        return balanced_labels(num, gan_cfg.num_classes)
    if not cfg.conditional:
        raise SampleError(
            f"--class needs a class-conditional run: checkpoint {path} was trained with "
            "conditional = false"
        )
    if not 0 <= class_id < gan_cfg.num_classes:
        raise SampleError(
            f"--class {class_id} is out of range: checkpoint {path} has classes "
            f"0..{gan_cfg.num_classes - 1}"
        )
    return torch.full((num,), class_id, dtype=torch.int64)


def _device(name: str) -> torch.device:
    """Resolve --device; a missing CUDA device is a SampleError."""
    try:
        return pick_device(name)
    except RuntimeError as exc:
        raise SampleError(f"--device {name}: no CUDA device is available") from exc


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: sample a checkpoint into an image grid; exit 2 with a message on bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m fedgan_app.sample",
        description="Draw images from a fedgan checkpoint's generator, without Flower.",
    )
    parser.add_argument("checkpoint", type=Path,
                        help=f"a checkpoint, e.g. outputs/<run>/{CHECKPOINTS_DIR}/"
                        f"{LATEST_CHECKPOINT}")
    parser.add_argument("--num", type=int, default=64, help="images to draw (default 64)")
    parser.add_argument("--class", dest="class_id", type=int, default=None,
                        help="draw every image of this class (conditional runs only)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the noise (default: the run's seed, i.e. its grid)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--ema", dest="ema", action="store_true", default=None,
                       help="the EMA generator (default when the checkpoint has one)")
    which.add_argument("--raw", dest="ema", action="store_false", default=None,
                       help="the raw global generator")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                        help="torch device (default cpu)")
    parser.add_argument("--columns", type=int, default=GRID_COLUMNS,
                        help=f"images per grid row (default {GRID_COLUMNS})")
    parser.add_argument("--out", type=Path, required=True, help="image to write, e.g. grid.png")
    args = parser.parse_args(argv)
    try:
        if args.columns < 1:
            raise SampleError(f"--columns must be >= 1, got {args.columns}")
        samples = sample_checkpoint(args.checkpoint, args.num, args.class_id, args.seed,
                                    args.ema, args.device)
        write_grid(samples.images, args.out, args.columns)
    except (CheckpointError, SampleError) as exc:
        print(f"fedgan sample: {exc}", file=sys.stderr)
        return 2
    of_class = "" if args.class_id is None else f" of class {args.class_id}"
    print(f"fedgan sample: {len(samples.images)} images{of_class} from the {samples.generator} "
          f"generator of round {samples.server_round} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
