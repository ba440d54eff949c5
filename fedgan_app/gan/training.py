"""Local adversarial training of one FedGAN agent: pure torch, no Flower, no I/O.

`train_gan(agent, batches, local)` trains an `Agent` (G, D and their Adam
optimizers) on a stream of batches for the `LocalRound` it is given: K steps
of the math a `StepRecipe` describes (loss, DiffAugment policy, ACGAN weight,
FedProx term), on a device, from one seeded RNG. How fast a step runs
(channels_last memory, one fused D pass, host syncs) never changes its math:
`tests/test_training.py` checks the fast step against a plain reference step.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from fedgan_app.config import RunConfig
from fedgan_app.gan.diffaugment import diff_augment, parse_policy
from fedgan_app.gan.models import Discriminator, Generator
from fedgan_app.settings import GAN_LOSSES, default


@dataclass(frozen=True)
class StepRecipe:
    """The math of one local step; the defaults are the app's settings' (`fedgan_app.settings`).

    Attributes
    ----------
    loss : str
        "bce": the non-saturating GAN loss with BCE on logits (DCGAN);
        "hinge": the hinge loss of SNGAN/BigGAN.
    augment : str
        DiffAugment policy applied to every D input ('' or 'none' for none),
        e.g. "translation,cutout".
    aux_weight : float
        Weight of ACGAN's auxiliary classification loss (conditional
        ACGAN discriminators only).
    proximal_mu : float
        FedProx's mu: each loss gets mu/2 * ||w - w_global||^2 (0: off; the
        server sends it only under strategy 'fedprox').
    mode_seeking : float
        Weight of the mode-seeking term (Mao et al. 2019, MSGAN): G's loss
        gets lambda / (mean |G(z1) - G(z2)| / mean |z1 - z2|) for a second
        batch drawn with the same labels (0: off).

    """

    loss: str = default("gan-loss")
    augment: str = default("diffaugment")
    aux_weight: float = default("aux-weight")
    proximal_mu: float = 0.0
    mode_seeking: float = default("mode-seeking")

    def __post_init__(self) -> None:
        """Reject unknown losses and augmentation policies."""
        if self.loss not in GAN_LOSSES:
            raise ValueError(f"loss must be one of {GAN_LOSSES}, got {self.loss!r}")
        parse_policy(self.augment)

    @classmethod
    def from_settings(cls, settings: RunConfig, proximal_mu: float = 0.0) -> StepRecipe:
        """The recipe of a RunConfig (gan-loss, diffaugment, aux-weight, mode-seeking)."""
        return cls(loss=settings.gan_loss, augment=settings.diffaugment,
                   aux_weight=settings.aux_weight, proximal_mu=proximal_mu,
                   mode_seeking=settings.mode_seeking)


@dataclass(frozen=True)
class Agent:
    """One FedGAN agent's nets and their optimizers, trained in place by `train_gan`."""

    generator: Generator
    discriminator: Discriminator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer


@dataclass(frozen=True)
class LocalRound:
    """How one call of `train_gan` runs.

    Attributes
    ----------
    steps : int
        Local steps K.
    device : torch.device
        Where the nets are.
    rng : torch.Generator
        CPU generator for noise, fake labels and augmentation, so a client's
        round is reproducible from (seed, round, partition id).
    recipe : StepRecipe
        The step's math.
    channels_last : bool
        Feed images in NHWC memory (call `to_channels_last` on the nets too).
    threads : Callable[[], int] | None
        Asked before every step for the torch thread count to use (e.g.
        `fedgan_app.federation.cores.CoreShare.threads`); None leaves it as it is.

    """

    steps: int
    device: torch.device
    rng: torch.Generator
    recipe: StepRecipe = field(default_factory=StepRecipe)
    channels_last: bool = False
    threads: Callable[[], int] | None = None


@dataclass(frozen=True)
class LocalStats:
    """Per-step histories of one call to `train_gan`."""

    loss_d: list[float]
    loss_g: list[float]
    d_x: list[float]  # mean sigmoid(D(x)) on the real batch
    d_gz: list[float]  # mean sigmoid(D(G(z))) on fakes, before G's update
    wall_time_s: float
    steps: int
    images_seen: int


def derive_seed(seed: int, *parts: int) -> int:
    """Mix the run seed with (round, partition id, ...) into a 63-bit seed."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def set_torch_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads: `threads`, else OMP_NUM_THREADS, else every core.

    Ray sets OMP_NUM_THREADS to an actor's `num_cpus`; a SuperNode process
    without it gets every core. Returns the thread count set.
    """
    if threads is None:
        threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1)
    threads = max(1, threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def make_optimizers(
    generator: nn.Module,
    discriminator: nn.Module,
    lr_g: float,
    lr_d: float,
    betas: tuple[float, float],
) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for G and for D (DCGAN betas by default settings)."""
    # fused: one kernel per step for all parameters (CPU and CUDA), same update rule.
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr_g, betas=betas, fused=True)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr_d, betas=betas, fused=True)
    return opt_g, opt_d


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every param group's learning rate (the server's schedule wins)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def to_channels_last(*modules: nn.Module) -> None:
    """Store conv weights as NHWC: oneDNN's fast layout on CPU (same math)."""
    for module in modules:
        module.to(memory_format=torch.channels_last)


def train_gan(
    agent: Agent,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    local: LocalRound,
) -> LocalStats:
    """Run `local.steps` adversarial steps: D on a real and a fake batch, then G.

    Parameters
    ----------
    agent : Agent
        G and D, already on `local.device`, and their optimizers; trained in place.
    batches : Iterator[tuple[torch.Tensor, torch.Tensor]]
        Yields (images (B, C, H, W) in [-1, 1], labels (B,)).
    local : LocalRound
        Steps, device, RNG, recipe and memory layout of this call.

    Returns
    -------
    LocalStats
        Per-step losses and D outputs, read from the device once at the end.

    """
    generator, discriminator, recipe = agent.generator, agent.discriminator, local.recipe
    policy = parse_policy(recipe.augment)
    generator.train()
    discriminator.train()
    anchors = None
    if recipe.proximal_mu > 0:
        anchors = (_anchor(generator), _anchor(discriminator))
    # Without BatchNorm in D, real and fake batches can share one D pass: the
    # same math (no batch statistics couple them) with bigger, faster convolutions.
    fused = not any(isinstance(m, nn.BatchNorm2d) for m in discriminator.modules())
    history: list[torch.Tensor] = []
    images_seen = 0
    start = time.perf_counter()
    for _ in range(local.steps):
        if local.threads is not None:
            set_torch_threads(local.threads())
        real, labels = next(batches)
        real = real.to(local.device, non_blocking=True)
        if local.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        labels = labels.to(local.device, non_blocking=True)
        z = torch.randn(real.size(0), generator.latent_dim, generator=local.rng)
        fake = generator(z.to(local.device), labels if generator.num_classes else None)

        # D step on real and (detached) fake images.
        loss_d, logits_real, logits_fake = _d_step(
            agent, real, fake.detach(), labels, policy, local.rng, recipe, fused,
            anchors[1] if anchors is not None else None)

        # G step: make the updated D call its fakes real.
        seeking = None
        # G's second batch must not count as a step in G's BatchNorm statistics;
        # they are put back after G's step, as its backward reads them.
        with batchnorm_stats_kept(generator) if recipe.mode_seeking > 0 else nullcontext():
            if recipe.mode_seeking > 0:
                z2 = torch.randn(real.size(0), generator.latent_dim, generator=local.rng)
                fake2 = generator(z2.to(local.device),
                                  labels if generator.num_classes else None)
                seeking = recipe.mode_seeking * mode_seeking_term(fake, fake2, z, z2)
            loss_g = _g_step(agent, fake, labels, policy, local.rng, recipe,
                             anchors[0] if anchors is not None else None, seeking)

        # Kept on the device: one host sync per call, not four per step.
        history.append(torch.stack([
            loss_d.detach(), loss_g.detach(),
            torch.sigmoid(logits_real.detach()).mean(),
            torch.sigmoid(logits_fake.detach()).mean(),
        ]))
        images_seen += real.size(0)
    columns = torch.stack(history).T.tolist() if history else [[], [], [], []]
    return LocalStats(
        loss_d=columns[0], loss_g=columns[1], d_x=columns[2], d_gz=columns[3],
        wall_time_s=time.perf_counter() - start, steps=local.steps,
        images_seen=images_seen,
    )


def _d_step(agent: Agent, real: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor,
            policy: tuple[str, ...], rng: torch.Generator, recipe: StepRecipe, fused: bool,
            anchor: list[torch.Tensor] | None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """D's step on a real and a (detached) fake batch; returns its loss and both logits."""
    discriminator = agent.discriminator
    h_real, h_fake = _d_features(discriminator, real, fake, policy, rng, fused)
    logits_real = discriminator.logits(h_real, labels)
    logits_fake = discriminator.logits(h_fake, labels)
    loss_d = _d_loss(recipe.loss, logits_real, logits_fake)
    if discriminator.conditioning == "acgan":
        loss_d = loss_d + recipe.aux_weight * (
            F.cross_entropy(discriminator.class_logits(h_real), labels)
            + F.cross_entropy(discriminator.class_logits(h_fake), labels)
        )
    if anchor is not None:
        loss_d = loss_d + proximal_term(discriminator, anchor, recipe.proximal_mu)
    agent.opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    agent.opt_d.step()
    return loss_d, logits_real, logits_fake


def _g_step(agent: Agent, fake: torch.Tensor, labels: torch.Tensor,
            policy: tuple[str, ...], rng: torch.Generator, recipe: StepRecipe,
            anchor: list[torch.Tensor] | None, extra: torch.Tensor | None = None
            ) -> torch.Tensor:
    """G's step on its fakes, plus `extra` (a term of G's alone); returns G's loss.

    D's weights get no gradient here (the next D step would discard it): its
    backward computes only the gradient that flows on to G, the same math for
    less work.
    """
    discriminator = agent.discriminator
    discriminator.requires_grad_(False)
    try:
        h_gen = discriminator.features(_augment(fake, policy, rng))
        loss_g = _g_loss(recipe.loss, discriminator.logits(h_gen, labels))
        if discriminator.conditioning == "acgan":
            loss_g = loss_g + recipe.aux_weight * F.cross_entropy(
                discriminator.class_logits(h_gen), labels)
        if anchor is not None:
            loss_g = loss_g + proximal_term(agent.generator, anchor, recipe.proximal_mu)
        if extra is not None:
            loss_g = loss_g + extra
        agent.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
    finally:
        discriminator.requires_grad_(True)
    agent.opt_g.step()
    return loss_g


@contextmanager
def batchnorm_stats_kept(module: nn.Module) -> Iterator[None]:
    """Put the running statistics of `module`'s BatchNorm layers back as they were on entry.

    A second forward pass in train mode (the mode-seeking batch) still
    normalizes by its own batch, but must not count as another step in the
    running mean, variance and batch count that a `batchnorm = 'local'` run
    keeps. Exit only after the backward of that pass: it reads the buffers.
    """
    buffers = [b for m in module.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
               for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():  # BatchNorm updates these tensors in place: same objects
            for now, before in zip(buffers, saved, strict=True):
                now.copy_(before)


def mode_seeking_term(fake: torch.Tensor, fake2: torch.Tensor, z: torch.Tensor,
                      z2: torch.Tensor) -> torch.Tensor:
    """MSGAN's term: 1 / (mean |fake - fake2| / mean |z - z2|), small when G spreads out.

    Both batches share their labels, so a G that maps different noise of one
    class to one image pays the most (Mao et al. 2019, eq. 2, as 1 / ratio).
    """
    ratio = (fake - fake2).abs().mean() / (z - z2).abs().mean().to(fake.device)
    return 1.0 / (ratio + 1e-5)


def _augment(x: torch.Tensor, policy: tuple[str, ...], rng: torch.Generator) -> torch.Tensor:
    """DiffAugment `x` when a policy is set."""
    return diff_augment(x, policy, rng) if policy else x


def _d_features(
    discriminator: Discriminator,
    real: torch.Tensor,
    fake: torch.Tensor,
    policy: tuple[str, ...],
    rng: torch.Generator,
    fused: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """D's features of the (augmented) real and fake batches."""
    if fused:
        both = discriminator.features(_augment(torch.cat([real, fake]), policy, rng))
        return both[: real.size(0)], both[real.size(0):]
    return (discriminator.features(_augment(real, policy, rng)),
            discriminator.features(_augment(fake, policy, rng)))


def _d_loss(loss: str, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """D's loss: BCE (real -> 1, fake -> 0) or hinge."""
    if loss == "hinge":
        return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()
    return (F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))
            + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake)))


def _g_loss(loss: str, logits_fake: torch.Tensor) -> torch.Tensor:
    """G's loss: non-saturating BCE (fake -> 1) or hinge's -D(G(z))."""
    if loss == "hinge":
        return -logits_fake.mean()
    return F.binary_cross_entropy_with_logits(logits_fake, torch.ones_like(logits_fake))


def _anchor(module: nn.Module) -> list[torch.Tensor]:
    """Detached copies of a module's parameters (FedProx's w_global)."""
    return [p.detach().clone() for p in module.parameters()]


def proximal_term(module: nn.Module, anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's mu/2 * ||w - w_anchor||^2 over a module's parameters (not buffers)."""
    total = sum((p - a).pow(2).sum() for p, a in zip(module.parameters(), anchor, strict=True))
    return 0.5 * mu * total


@torch.inference_mode()
def discriminator_accuracy(
    generator: Generator,
    discriminator: Discriminator,
    real: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    rng: torch.Generator,
) -> float:
    """Fraction of real and generated images D classifies correctly (eval mode)."""
    generator.eval()
    discriminator.eval()
    real, labels = real.to(device), labels.to(device)
    cond = labels if generator.num_classes else None
    z = torch.randn(real.size(0), generator.latent_dim, generator=rng).to(device)
    fake = generator(z, cond)
    correct = (discriminator(real, labels) > 0).sum() + (discriminator(fake, labels) <= 0).sum()
    return correct.item() / (2 * real.size(0))


@torch.inference_mode()
def sample_images(
    generator: Generator,
    noise: torch.Tensor,
    device: torch.device,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate images from fixed noise (and labels) in eval mode; returns a CPU tensor."""
    was_training = generator.training
    generator.eval()
    try:
        cond = labels.to(device) if labels is not None else None
        return generator(noise.to(device), cond).cpu()
    finally:
        generator.train(was_training)
