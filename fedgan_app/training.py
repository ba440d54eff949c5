"""Local adversarial training of one FedGAN agent: pure torch, no Flower, no I/O."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


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


def set_torch_threads() -> int:
    """Use as many torch threads as CPUs this client was given.

    Ray sets OMP_NUM_THREADS to an actor's `num_cpus`; a SuperNode process
    without it gets every core. Returns the thread count set.
    """
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return threads


def make_optimizers(
    generator: nn.Module,
    discriminator: nn.Module,
    lr_g: float,
    lr_d: float,
    betas: tuple[float, float],
) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for G and for D with DCGAN betas."""
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr_g, betas=betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr_d, betas=betas)
    return opt_g, opt_d


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every param group's learning rate (the server's schedule wins)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_gan(
    generator: nn.Module,
    discriminator: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    batches: Iterator[torch.Tensor],
    steps: int,
    latent_dim: int,
    device: torch.device,
    rng: torch.Generator,
    proximal_mu: float = 0.0,
) -> LocalStats:
    """Run `steps` adversarial steps (non-saturating GAN loss, BCE with logits).

    Each step updates D on a real batch and a fake batch, then G to make D
    call its fakes real. Noise comes from `rng` (a CPU generator) so a client's
    round is reproducible from (seed, round, partition id). With
    `proximal_mu` > 0 each loss gets FedProx's term mu/2 * ||w - w_global||^2,
    w_global being the weights the call started from (the received model).
    """
    generator.train()
    discriminator.train()
    anchor_g = _anchor(generator) if proximal_mu > 0 else None
    anchor_d = _anchor(discriminator) if proximal_mu > 0 else None
    loss_d_hist, loss_g_hist, d_x_hist, d_gz_hist = [], [], [], []
    images_seen = 0
    start = time.perf_counter()
    for _ in range(steps):
        real = next(batches).to(device, non_blocking=True)
        n = real.size(0)
        z = torch.randn(n, latent_dim, generator=rng).to(device)
        ones = torch.ones(n, device=device)
        zeros = torch.zeros(n, device=device)

        # D step: maximize log D(x) + log(1 - D(G(z))).
        fake = generator(z)
        logits_real = discriminator(real)
        logits_fake = discriminator(fake.detach())
        loss_d = F.binary_cross_entropy_with_logits(
            logits_real, ones
        ) + F.binary_cross_entropy_with_logits(logits_fake, zeros)
        if anchor_d is not None:
            loss_d = loss_d + proximal_term(discriminator, anchor_d, proximal_mu)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

        # G step, non-saturating: maximize log D(G(z)).
        loss_g = F.binary_cross_entropy_with_logits(discriminator(fake), ones)
        if anchor_g is not None:
            loss_g = loss_g + proximal_term(generator, anchor_g, proximal_mu)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()

        loss_d_hist.append(loss_d.item())
        loss_g_hist.append(loss_g.item())
        d_x_hist.append(torch.sigmoid(logits_real).mean().item())
        d_gz_hist.append(torch.sigmoid(logits_fake).mean().item())
        images_seen += n
    return LocalStats(
        loss_d=loss_d_hist,
        loss_g=loss_g_hist,
        d_x=d_x_hist,
        d_gz=d_gz_hist,
        wall_time_s=time.perf_counter() - start,
        steps=steps,
        images_seen=images_seen,
    )


def _anchor(module: nn.Module) -> list[torch.Tensor]:
    """Detached copies of a module's parameters (FedProx's w_global)."""
    return [p.detach().clone() for p in module.parameters()]


def proximal_term(module: nn.Module, anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's mu/2 * ||w - w_anchor||^2 over a module's parameters (not buffers)."""
    total = sum((p - a).pow(2).sum() for p, a in zip(module.parameters(), anchor, strict=True))
    return 0.5 * mu * total


@torch.no_grad()
def discriminator_accuracy(
    generator: nn.Module,
    discriminator: nn.Module,
    real: torch.Tensor,
    latent_dim: int,
    device: torch.device,
    rng: torch.Generator,
) -> float:
    """Fraction of real and generated images D classifies correctly (eval mode)."""
    generator.eval()
    discriminator.eval()
    real = real.to(device)
    fake = generator(torch.randn(real.size(0), latent_dim, generator=rng).to(device))
    correct = (discriminator(real) > 0).sum() + (discriminator(fake) <= 0).sum()
    return correct.item() / (2 * real.size(0))


@torch.no_grad()
def sample_images(
    generator: nn.Module, noise: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Generate images from fixed noise in eval mode; returns a CPU tensor."""
    was_training = generator.training
    generator.eval()
    try:
        return generator(noise.to(device)).cpu()
    finally:
        generator.train(was_training)
