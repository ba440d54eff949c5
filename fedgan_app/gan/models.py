"""DCGAN generator and discriminator (optionally class-conditional).

The nets follow pytorch/examples' DCGAN recipe (normal(0, 0.02) init,
BatchNorm and ReLU in G, LeakyReLU in D, tanh output) scaled for 28x28 and
32x32 images: two stride-2 layers take a (H/4)x(H/4) map to HxW. Settings
choose the widths, D's normalisation (BatchNorm or spectral norm) and, for a
conditional GAN, how D sees the class (ACGAN's auxiliary classifier or a
projection discriminator). No Flower, no files, no logging here: packing the
pair into a message is `fedgan_app.protocol.message`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrizations

from fedgan_app.config import RunConfig
from fedgan_app.settings import CONDITIONINGS, D_NORMS, G_CONDITIONINGS, default


class ModelShapeError(ValueError):
    """The image shape or a model setting is one the DCGAN cannot be built for."""


@dataclass(frozen=True)
class GANConfig:
    """Shape and architecture settings of the GAN pair (no globals read by the models).

    The architecture's defaults are the app's settings' (`fedgan_app.settings`),
    so a bare GANConfig is the default run's pair for 28x28 grey images.
    """

    channels: int = 1
    image_size: int = 28
    latent_dim: int = default("latent-dim")
    g_width: int = default("g-width")  # ngf: G's widest layer has 4 * g_width maps
    g_depth: int = default("g-depth")  # extra 3x3 layers in G at half the image size
    d_width: int = default("d-width")  # ndf: D's widest layer has 2 * d_width maps
    d_norm: str = default("d-norm")  # or "spectral": spectral norm on every D layer, no BN
    num_classes: int = 0  # > 0: class-conditional G and D
    conditioning: str = default("conditioning")  # how a conditional D uses the label
    # how a conditional G uses it: "input" (one-hot beside z) or "batchnorm" (also
    # a per-class gain and bias in each of G's BatchNorm layers)
    g_conditioning: str = default("g-conditioning")
    # > 0: D's head also sees its features' spread over groups of this many images
    d_minibatch_std: int = default("d-minibatch-std")

    def __post_init__(self) -> None:
        """Reject shapes the two stride-2 stages cannot produce, and unknown options."""
        if self.channels not in (1, 3):
            raise ModelShapeError(f"images must have 1 or 3 channels, got {self.channels}")
        if self.image_size % 4 != 0 or not 8 <= self.image_size <= 64:
            raise ModelShapeError(
                f"image size must be a multiple of 4 between 8 and 64 (e.g. 28 or "
                f"32), got {self.image_size}"
            )
        if self.latent_dim < 1 or self.g_width < 1 or self.d_width < 1:
            raise ModelShapeError(
                f"latent_dim, g_width and d_width must be >= 1, got {self.latent_dim}, "
                f"{self.g_width}, {self.d_width}"
            )
        if self.g_depth < 0:
            raise ModelShapeError(f"g_depth must be >= 0, got {self.g_depth}")
        if self.d_norm not in D_NORMS:
            raise ModelShapeError(f"d_norm must be one of {D_NORMS}, got {self.d_norm!r}")
        if self.num_classes < 0 or self.num_classes == 1:
            raise ModelShapeError(
                f"num_classes must be 0 (unconditional) or >= 2, got {self.num_classes}"
            )
        if self.conditioning not in CONDITIONINGS:
            raise ModelShapeError(
                f"conditioning must be one of {CONDITIONINGS}, got {self.conditioning!r}"
            )
        if self.g_conditioning not in G_CONDITIONINGS:
            raise ModelShapeError(f"g_conditioning must be one of {G_CONDITIONINGS}, got "
                                  f"{self.g_conditioning!r}")
        if self.g_conditioning != "input" and not self.num_classes:
            raise ModelShapeError(f"g_conditioning {self.g_conditioning!r} needs a "
                                  "class-conditional GAN (num_classes >= 2)")

    @classmethod
    def for_images(
        cls, image_shape: tuple[int, int, int], latent_dim: int, **arch: object
    ) -> GANConfig:
        """Size the GAN for (C, H, W) images; only square images are supported."""
        channels, height, width = image_shape
        if height != width:
            raise ModelShapeError(
                f"images must be square (e.g. 28x28 or 32x32), got {height}x{width}"
            )
        return cls(channels=channels, image_size=height, latent_dim=latent_dim, **arch)

    @property
    def base_size(self) -> int:
        """Side of the smallest feature map (7 for 28x28, 8 for 32x32)."""
        return self.image_size // 4

    @property
    def conditional(self) -> bool:
        """Whether G and D take class labels."""
        return self.num_classes > 0


class Generator(nn.Module):
    """Map z (N, latent_dim) [and labels (N,)] to images (N, C, H, W) in [-1, 1]."""

    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        w, s = cfg.g_width, cfg.base_size
        self.latent_dim = cfg.latent_dim
        self.num_classes = cfg.num_classes
        # A conditional G sees z concatenated with the label's one-hot code, and
        # with g_conditioning "batchnorm" the label also sets each BatchNorm's affine.
        if cfg.g_conditioning == "batchnorm":
            def norm(maps: int) -> nn.Module:
                return ConditionalBatchNorm2d(maps, cfg.num_classes)
        else:
            norm = nn.BatchNorm2d
        self.net = nn.Sequential(
            # (latent_dim + num_classes) x 1 x 1
            nn.ConvTranspose2d(cfg.latent_dim + cfg.num_classes, w * 4, s, 1, 0, bias=False),
            norm(w * 4),
            nn.ReLU(True),
            # (w*4) x s x s
            nn.ConvTranspose2d(w * 4, w * 2, 4, 2, 1, bias=False),
            norm(w * 2),
            nn.ReLU(True),
            # (w*2) x 2s x 2s, refined by g_depth more layers of the same size
            *(layer for _ in range(cfg.g_depth) for layer in (
                nn.Conv2d(w * 2, w * 2, 3, 1, 1, bias=False), norm(w * 2), nn.ReLU(True))),
            nn.ConvTranspose2d(w * 2, cfg.channels, 4, 2, 1, bias=False),
            nn.Tanh(),
            # C x 4s x 4s
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Generate images from noise (N, latent_dim) and, if conditional, labels (N,)."""
        code = self.code(z, labels)
        x = self._project(code)
        for layer in self.net[1:]:
            x = layer(x, labels) if isinstance(layer, ConditionalBatchNorm2d) else layer(x)
        return x

    def code(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """G's input (N, latent_dim [+ num_classes]): z, and the label's one-hot code."""
        z = z.flatten(1)
        if not self.num_classes:
            return z
        if labels is None:
            raise ValueError("a conditional generator needs labels")
        onehot = nn.functional.one_hot(labels, self.num_classes).to(z.dtype)
        return torch.cat([z, onehot], dim=1)

    def _project(self, code: torch.Tensor) -> torch.Tensor:
        """The first layer, (N, in) -> (N, w*4, s, s), as one matrix product.

        A transposed convolution of a 1x1 input is exactly code @ W viewed as
        (in, w*4*s*s), and torch's CPU kernel for it is far slower than the
        matrix product (benchmarks/results/throughput.md, "The local step").
        The weight stays the ConvTranspose2d's: checkpoints and aggregation are
        unchanged.
        """
        weight = self.net[0].weight  # (in, w*4, s, s)
        n, (_, maps, s, _) = code.size(0), weight.shape
        if not _stored_nhwc(weight):
            return (code @ weight.flatten(1)).view(n, maps, s, s)
        # NHWC-stored weight (to_channels_last): multiply in its own layout, no copy;
        # the result comes out channels_last too, as the next layer wants it.
        nhwc = weight.permute(0, 2, 3, 1).flatten(1)
        return (code @ nhwc).view(n, s, s, maps).permute(0, 3, 1, 2)


class ConditionalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose gain and bias are the label's rows of an embedding (N, C, H, W).

    The statistics are the batch's over every class, as in plain BatchNorm
    (they stay buffers, recomputed from noise on the server); the affine step
    is per class: gain and bias are the two halves of `embed(label)`
    (the G of Miyato & Koyama 2018; BigGAN's is a variant). Each class's row gets
    gradient only from its own images, which makes it a class row for
    class-aware aggregation (`fedgan_app.federation.classes`).
    """

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__(num_features, affine=False)
        self.embed = nn.Embedding(num_classes, 2 * num_features)
        self.reset_affine()

    def reset_affine(self, std: float = 0.0) -> None:
        """Gains ~ N(1, std), biases 0: plain BatchNorm's start for every class."""
        with torch.no_grad():
            gain, bias = self.embed.weight.chunk(2, dim=1)
            gain.normal_(1.0, std)  # std 0: every gain exactly 1
            bias.zero_()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise `x`, then scale and shift each image by its label's gain and bias."""
        if labels is None:
            raise ValueError("conditional BatchNorm needs labels")
        gain, bias = self.embed(labels).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        return super().forward(x) * gain + bias


class Discriminator(nn.Module):
    """Map images (N, C, H, W) [and labels] to a real-vs-fake logit each, shape (N,).

    A conditional D either has ACGAN's auxiliary head (`class_logits` gives
    (N, num_classes) from the same features; `forward` ignores the labels) or
    is a projection discriminator (the logit adds <embed(y), features>).
    """

    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        w, s = cfg.d_width, cfg.base_size
        spectral = cfg.d_norm == "spectral"
        norm = _spectral if spectral else _identity
        self.net = nn.Sequential(
            # C x 4s x 4s
            norm(nn.Conv2d(cfg.channels, w, 4, 2, 1, bias=spectral)),
            # Not in place: the first layer's output is a view (`_first_layer`), and
            # autograd's backward of an in-place op on a view copies the gradient to NCHW.
            nn.LeakyReLU(0.2),
            # w x 2s x 2s
            norm(nn.Conv2d(w, w * 2, 4, 2, 1, bias=spectral)),
            *([] if spectral else [nn.BatchNorm2d(w * 2)]),
            nn.LeakyReLU(0.2, inplace=True),
            # (w*2) x s x s
        )
        # 1 x 1 x 1: a logit, no sigmoid (BCE-with-logits and hinge take logits);
        # with minibatch std the head sees one more channel: the features' spread
        self.group = cfg.d_minibatch_std
        self.head = norm(nn.Conv2d(w * 2 + (1 if self.group else 0), 1, s, 1, 0, bias=False))
        self.num_classes = cfg.num_classes
        self.conditioning = cfg.conditioning if cfg.num_classes else ""
        if self.conditioning == "acgan":
            self.aux = norm(nn.Conv2d(w * 2, cfg.num_classes, s, 1, 0, bias=True))
        elif self.conditioning == "projection":
            self.embed = norm(nn.Embedding(cfg.num_classes, w * 2 * s * s))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, (N, 2*d_width, s, s)."""
        return self.net[1:](self._first_layer(x))

    def _first_layer(self, x: torch.Tensor) -> torch.Tensor:
        """The first convolution, (N, C, 4s, 4s) -> (N, d_width, 2s, 2s), as one matrix product.

        Unfold the 4x4 patches, then multiply by the weight: the same sums as
        the convolution. With C = 1 or 3 input channels oneDNN's convolution
        is far from its best, above all when the input's gradient is needed
        too (G's step) (benchmarks/results/throughput.md, "The local step").
        """
        conv = self.net[0]
        weight = conv.weight  # (w, C, 4, 4); through spectral norm when there is one
        n, _, height, width = x.shape
        (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
        rows, cols = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
        patches = nn.functional.unfold(x, (kh, kw), padding=(ph, pw), stride=(sh, sw))
        out = patches.transpose(1, 2) @ weight.flatten(1).t()  # (N, L, w)
        if conv.bias is not None:
            out = out + conv.bias
        out = out.view(n, rows, cols, -1).permute(0, 3, 1, 2)  # NHWC in memory
        # NHWC as the next layer's weight is stored (to_channels_last), else NCHW.
        return out if _stored_nhwc(_stored_weight(self.net[2])) else out.contiguous()

    def logits(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Real-vs-fake logits (N,) from features `h`."""
        out = self._head_with_spread(h) if self.group else self.head(h).view(-1)
        if self.conditioning == "projection":
            if labels is None:
                raise ValueError("a projection discriminator needs labels")
            # <embed(y), h> over (C, s, s), in h's own memory layout: flattening an
            # NHWC h copies it to NCHW, so its gradient meets the head's NHWC one in
            # D's backward, and elementwise ops on mixed layouts are slow on CPUs
            # (benchmarks/results/throughput.md, "The local step").
            embedding = self.embed(labels).view_as(h)
            if _stored_nhwc(h):
                embedding = embedding.contiguous(memory_format=torch.channels_last)
            out = out + (embedding * h).sum(dim=(1, 2, 3))
        return out

    def _head_with_spread(self, h: torch.Tensor) -> torch.Tensor:
        """The head on `minibatch_std(h)`, as two sums: no concatenated copy of h.

        The head's kernel covers the whole s x s map, and the spread channel is
        one value per image, so its part of the logit is that value times the
        sum of its kernel; the rest is the head on h with the other channels
        (h's layout kept, where the concatenation made every next op copy).
        """
        weight = self.head.weight  # through spectral norm when there is one
        channels = h.size(1)
        main = weight[:, :channels]
        if _stored_nhwc(h):
            main = main.contiguous(memory_format=torch.channels_last)
        spread = group_spread(h, self.group) * weight[0, channels].sum()
        return nn.functional.conv2d(h, main).view(-1) + spread

    def class_logits(self, h: torch.Tensor) -> torch.Tensor:
        """ACGAN's class logits (N, num_classes) from features `h`."""
        return self.aux(h).flatten(1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Return real-vs-fake logits of shape (N,)."""
        return self.logits(self.features(x), labels)


def minibatch_std(h: torch.Tensor, group: int) -> torch.Tensor:
    """`h` (N, C, H, W) with one more channel: its spread over groups of images.

    The layer as Karras et al. (2018) write it; D's head gets the same sum
    from `group_spread` without building the channel (`Discriminator.logits`).
    """
    n = h.size(0)
    channel = group_spread(h, group).view(n, 1, 1, 1)
    return torch.cat([h, channel.expand(n, 1, *h.shape[2:])], dim=1)


def group_spread(h: torch.Tensor, group: int) -> torch.Tensor:
    """Per image (N,): the standard deviation of its group, averaged over C, H and W.

    Images are grouped in consecutive runs of `group` (or of the largest size
    below it that divides N, so no group mixes two batches called together).
    """
    n = h.size(0)
    size = max(g for g in range(1, min(group, n) + 1) if n % g == 0)
    # (groups, size, H*W*C): a view of an NHWC h, whose layout makes the reduction
    # over a group a contiguous one (torch's var over a strided dim of the same
    # tensor took 4x longer)
    grouped = h.permute(0, 2, 3, 1).reshape(n // size, size, -1).float()
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    spread = (centred.square().mean(dim=1) + 1e-8).sqrt().mean(dim=1)
    return spread.to(h.dtype).repeat_interleave(size)


def _stored_nhwc(tensor: torch.Tensor) -> bool:
    """Whether a 4-d tensor is stored channels_last (and not also NCHW-contiguous)."""
    return not tensor.is_contiguous() and tensor.is_contiguous(
        memory_format=torch.channels_last)


def _stored_weight(layer: nn.Module) -> torch.Tensor:
    """A layer's weight as stored (spectral norm: the original, not `.weight`).

    Reading `.weight` of a spectral-norm layer in training mode runs a power
    iteration, which would change the next forward pass.
    """
    if hasattr(layer, "parametrizations"):
        return layer.parametrizations.weight.original
    return layer.weight


def _spectral(module: nn.Module) -> nn.Module:
    """Wrap a layer in spectral normalisation (Miyato et al. 2018)."""
    return parametrizations.spectral_norm(module)


def _identity(module: nn.Module) -> nn.Module:
    """Leave a layer as it is."""
    return module


def weights_init(module: nn.Module) -> None:
    """DCGAN init: conv weights ~ N(0, 0.02), BatchNorm weight ~ N(1, 0.02), bias 0.

    A conditional BatchNorm's per-class gains and biases start as BatchNorm's.
    """
    if isinstance(module, ConditionalBatchNorm2d):
        # After its embedding (children first): DCGAN's BatchNorm init per class.
        module.reset_affine(std=0.02)
    elif isinstance(module, nn.Conv2d | nn.ConvTranspose2d | nn.Embedding):
        weight = _stored_weight(module)
        nn.init.normal_(weight, 0.0, 0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_gan(cfg: GANConfig, seed: int) -> tuple[Generator, Discriminator]:
    """Build G and D with DCGAN init; the same seed gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        # Leave the caller's global RNG as it was.
        torch.manual_seed(seed)
        generator, discriminator = Generator(cfg), Discriminator(cfg)
        generator.apply(weights_init)
        discriminator.apply(weights_init)
    return generator, discriminator


def batchnorm_stat_keys(state_keys: list[str] | frozenset[str]) -> frozenset[str]:
    """Keys of BatchNorm running statistics among packed/state_dict keys."""
    suffixes = (".running_mean", ".running_var", ".num_batches_tracked")
    return frozenset(k for k in state_keys if k.endswith(suffixes))


@torch.no_grad()
def recalibrate_batchnorm(
    generator: Generator,
    num_batches: int = 16,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | None = None,
) -> None:
    """Recompute G's BatchNorm running statistics for its current weights, from noise.

    G's activations depend on z (and labels) only, so the server can measure
    exact population statistics without any data ("precise BN"): reset the
    statistics, run `num_batches` seeded noise batches in train mode with a
    cumulative average, and return to eval mode. Needed after averaging
    (the clients' statistics belong to their pre-average weights), for an
    EMA generator, and when clients keep their statistics local.
    """
    layers = [m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return
    device = device or next(generator.parameters()).device
    momenta = [m.momentum for m in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative moving average over the batches
    rng = torch.Generator().manual_seed(seed)
    generator.train()
    try:
        for _ in range(num_batches):
            z = torch.randn(batch_size, generator.latent_dim, generator=rng).to(device)
            labels = None
            if generator.num_classes:
                labels = torch.randint(0, generator.num_classes, (batch_size,),
                                       generator=rng).to(device)
            generator(z, labels)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
        generator.eval()


def pick_device(name: str) -> torch.device:
    """Resolve the 'device' setting: 'auto' picks CUDA when it is available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("setting 'device' is 'cuda' but no CUDA device is available")
    return torch.device(name)


def gan_config(
    settings: RunConfig, image_shape: tuple[int, int, int], num_classes: int
) -> GANConfig:
    """The GANConfig a run's settings ask for, sized for its images and classes."""
    return GANConfig.for_images(
        image_shape, settings.latent_dim, g_width=settings.g_width, g_depth=settings.g_depth,
        d_width=settings.d_width, d_norm=settings.d_norm,
        num_classes=num_classes if settings.conditional else 0,
        conditioning=settings.conditioning, g_conditioning=settings.g_conditioning,
        d_minibatch_std=settings.d_minibatch_std,
    )
