"""DCGAN generator and discriminator, and packing both into one ArrayRecord.

The nets follow pytorch/examples' DCGAN recipe (normal(0, 0.02) init,
BatchNorm, ReLU in G, LeakyReLU in D, tanh output) scaled down for 28x28 and
32x32 images: two stride-2 layers take a (H/4)x(H/4) map to HxW. No Flower
I/O, no files, no logging here.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord
from torch import nn

G_PREFIX = "generator."
D_PREFIX = "discriminator."


class ModelShapeError(ValueError):
    """The image shape is one the DCGAN cannot be built for."""


@dataclass(frozen=True)
class GANConfig:
    """Shape settings of the GAN pair (no globals read by the models)."""

    channels: int = 1
    image_size: int = 28
    latent_dim: int = 100
    g_width: int = 32  # ngf: G's widest layer has 4 * g_width feature maps
    d_width: int = 64  # ndf

    def __post_init__(self) -> None:
        """Reject shapes the two stride-2 stages cannot produce."""
        if self.channels not in (1, 3):
            raise ModelShapeError(
                f"images must have 1 or 3 channels, got {self.channels}"
            )
        if self.image_size % 4 != 0 or not 8 <= self.image_size <= 64:
            raise ModelShapeError(
                f"image size must be a multiple of 4 between 8 and 64 (e.g. 28 or "
                f"32), got {self.image_size}"
            )
        if self.latent_dim < 1:
            raise ModelShapeError(f"latent_dim must be >= 1, got {self.latent_dim}")

    @classmethod
    def for_images(cls, image_shape: tuple[int, int, int], latent_dim: int) -> GANConfig:
        """Size the GAN for (C, H, W) images; only square images are supported."""
        channels, height, width = image_shape
        if height != width:
            raise ModelShapeError(
                f"images must be square (e.g. 28x28 or 32x32), got {height}x{width}"
            )
        return cls(channels=channels, image_size=height, latent_dim=latent_dim)

    @property
    def base_size(self) -> int:
        """Side of the smallest feature map (7 for 28x28, 8 for 32x32)."""
        return self.image_size // 4


class Generator(nn.Module):
    """Map z (N, latent_dim) to images (N, C, H, W) in [-1, 1]."""

    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        w, s = cfg.g_width, cfg.base_size
        self.latent_dim = cfg.latent_dim
        self.net = nn.Sequential(
            # z as (latent_dim) x 1 x 1
            nn.ConvTranspose2d(cfg.latent_dim, w * 4, s, 1, 0, bias=False),
            nn.BatchNorm2d(w * 4),
            nn.ReLU(True),
            # (w*4) x s x s
            nn.ConvTranspose2d(w * 4, w * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(w * 2),
            nn.ReLU(True),
            # (w*2) x 2s x 2s
            nn.ConvTranspose2d(w * 2, cfg.channels, 4, 2, 1, bias=False),
            nn.Tanh(),
            # C x 4s x 4s
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Generate images from noise of shape (N, latent_dim)."""
        return self.net(z.view(z.size(0), -1, 1, 1))


class Discriminator(nn.Module):
    """Map images (N, C, H, W) to one real-vs-fake logit each, shape (N,)."""

    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        w, s = cfg.d_width, cfg.base_size
        self.net = nn.Sequential(
            # C x 4s x 4s
            nn.Conv2d(cfg.channels, w, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
            # w x 2s x 2s
            nn.Conv2d(w, w * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(w * 2),
            nn.LeakyReLU(0.2, inplace=True),
            # (w*2) x s x s
            nn.Conv2d(w * 2, 1, s, 1, 0, bias=False),
            # 1 x 1 x 1: a logit, no sigmoid (BCE-with-logits is stabler)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (N,)."""
        return self.net(x).view(-1)


def weights_init(module: nn.Module) -> None:
    """DCGAN init: conv weights ~ N(0, 0.02), BatchNorm weight ~ N(1, 0.02), bias 0."""
    name = type(module).__name__
    if "Conv" in name:
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_gan(cfg: GANConfig, seed: int) -> tuple[Generator, Discriminator]:
    """Build G and D with DCGAN init; the same seed gives the same weights."""
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        generator, discriminator = Generator(cfg), Discriminator(cfg)
        generator.apply(weights_init)
        discriminator.apply(weights_init)
    finally:
        # Leave the caller's global RNG as it was.
        torch.random.set_rng_state(rng_state)
    return generator, discriminator


def pack_gan(generator: nn.Module, discriminator: nn.Module) -> ArrayRecord:
    """Put both full state_dicts (BatchNorm buffers too) into one ArrayRecord."""
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for prefix, net in ((G_PREFIX, generator), (D_PREFIX, discriminator)):
        for key, tensor in net.state_dict().items():
            state[prefix + key] = tensor.detach().cpu()
    return ArrayRecord(state)


def split_state(
    state: dict[str, torch.Tensor],
) -> tuple[OrderedDict[str, torch.Tensor], OrderedDict[str, torch.Tensor]]:
    """Split a packed state_dict into the generator's and the discriminator's."""
    g_state: OrderedDict[str, torch.Tensor] = OrderedDict()
    d_state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, tensor in state.items():
        if key.startswith(G_PREFIX):
            g_state[key[len(G_PREFIX):]] = tensor
        elif key.startswith(D_PREFIX):
            d_state[key[len(D_PREFIX):]] = tensor
        else:
            raise KeyError(f"array key {key!r} has neither prefix {G_PREFIX!r} nor "
                           f"{D_PREFIX!r}")
    return g_state, d_state


def unpack_gan(
    arrays: ArrayRecord, generator: nn.Module, discriminator: nn.Module
) -> None:
    """Load a packed ArrayRecord into G and D in place (strict: keys must match)."""
    g_state, d_state = split_state(arrays.to_torch_state_dict())
    # load_state_dict casts averaged float64 num_batches_tracked back to int64.
    generator.load_state_dict(g_state, strict=True)
    discriminator.load_state_dict(d_state, strict=True)


def pick_device(name: str) -> torch.device:
    """Resolve the 'device' setting: 'auto' picks CUDA when it is available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("setting 'device' is 'cuda' but no CUDA device is available")
    return torch.device(name)
