"""The local step: the fast step keeps the math of a plain reference step."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch.nn import functional as F

from fedgan_app.config import RunConfig
from fedgan_app.gan.diffaugment import diff_augment, parse_policy
from fedgan_app.gan.models import GANConfig, Generator, build_gan, gan_config
from fedgan_app.gan.training import (
    Agent,
    LocalRound,
    StepRecipe,
    make_optimizers,
    mode_seeking_term,
    proximal_term,
    to_channels_last,
    train_gan,
)

STEPS = 5
BATCH = 16
# channels_last (NHWC) runs other oneDNN kernels, the first layers as matrix
# products and fused Adam other vector code, all adding floats in another order:
# the first step differs by ~1e-6, and the adversarial dynamics amplify that to
# ~4e-5 by the third step (measured). Over 3 steps we allow 1e-3.
CL_STEPS, CL_ATOL = 3, 1e-3


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(64, 1, 28, 28, generator=gen) * 2 - 1, torch.randint(0, 10, (64,),
                                                                        generator=gen)


def _batches(images: torch.Tensor, labels: torch.Tensor
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    step = 0
    while True:
        index = torch.arange(step * BATCH, (step + 1) * BATCH) % images.size(0)
        yield images[index], labels[index]
        step += 1


def plain_generator(generator: Generator, z: torch.Tensor,
                    labels: torch.Tensor | None) -> torch.Tensor:
    """G as DCGAN writes it: every layer, the first a transposed convolution of 1x1."""
    code = generator.code(z, labels)
    return generator.net(code.view(code.size(0), -1, 1, 1))


def reference_step_losses(cfg: GANConfig, recipe: StepRecipe, seed: int,
                          steps: int = STEPS, plain: bool = False) -> list[list[float]]:
    """A plain, unfused, contiguous DCGAN step written out in full: the math we keep.

    D's weights collect gradients in G's step too, four host syncs per step.
    `plain` also runs the nets layer by layer as DCGAN writes them (G's first
    layer a transposed convolution, D's a convolution) and swaps the app's
    fused Adam for torch's per-tensor loop.
    """
    generator, discriminator = build_gan(cfg, 0)
    if plain:
        # Adam as torch writes it, one tensor at a time (the app's is the fused kernel).
        opt_g = torch.optim.Adam(generator.parameters(), 2e-4, (0.5, 0.999), foreach=False)
        opt_d = torch.optim.Adam(discriminator.parameters(), 2e-4, (0.5, 0.999),
                                 foreach=False)
    else:
        opt_g, opt_d = make_optimizers(generator, discriminator, 2e-4, 2e-4, (0.5, 0.999))
    images, labels = _data()
    batches = _batches(images, labels)
    rng = torch.Generator().manual_seed(seed)
    policy = parse_policy(recipe.augment)
    spectral = cfg.d_norm == "spectral"
    d_features = discriminator.net if plain else discriminator.features
    history = []
    for _ in range(steps):
        real, y = next(batches)
        z = torch.randn(real.size(0), cfg.latent_dim, generator=rng)
        labels = y if cfg.num_classes else None
        fake = plain_generator(generator, z, labels) if plain else generator(z, labels)
        # D: real and fake; a D without BatchNorm sees both in one pass by definition.
        if spectral:
            both = torch.cat([real, fake.detach()])
            h = d_features(diff_augment(both, policy, rng) if policy else both)
            h_real, h_fake = h[:BATCH], h[BATCH:]
        else:
            aug = (lambda x: diff_augment(x, policy, rng)) if policy else (lambda x: x)
            h_real = d_features(aug(real))
            h_fake = d_features(aug(fake.detach()))
        lr_, lf_ = discriminator.logits(h_real, y), discriminator.logits(h_fake, y)
        if recipe.loss == "hinge":
            loss_d = F.relu(1 - lr_).mean() + F.relu(1 + lf_).mean()
        else:
            loss_d = (F.binary_cross_entropy_with_logits(lr_, torch.ones(BATCH))
                      + F.binary_cross_entropy_with_logits(lf_, torch.zeros(BATCH)))
        if discriminator.conditioning == "acgan":
            loss_d = loss_d + recipe.aux_weight * (
                F.cross_entropy(discriminator.class_logits(h_real), y)
                + F.cross_entropy(discriminator.class_logits(h_fake), y))
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        h_gen = d_features(diff_augment(fake, policy, rng) if policy else fake)
        out = discriminator.logits(h_gen, y)
        if recipe.loss == "hinge":
            loss_g = -out.mean()
        else:
            loss_g = F.binary_cross_entropy_with_logits(out, torch.ones(BATCH))
        if discriminator.conditioning == "acgan":
            loss_g = loss_g + recipe.aux_weight * F.cross_entropy(
                discriminator.class_logits(h_gen), y)
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        history.append([loss_d.item(), loss_g.item(), torch.sigmoid(lr_).mean().item(),
                        torch.sigmoid(lf_).mean().item()])
    return history


def fast_step_losses(cfg: GANConfig, recipe: StepRecipe, seed: int,
                     channels_last: bool, steps: int = STEPS) -> list[list[float]]:
    """The app's train_gan on the same models, data and noise."""
    generator, discriminator = build_gan(cfg, 0)
    opt_g, opt_d = make_optimizers(generator, discriminator, 2e-4, 2e-4, (0.5, 0.999))
    if channels_last:
        to_channels_last(generator, discriminator)
    images, labels = _data()
    local = LocalRound(steps, torch.device("cpu"), torch.Generator().manual_seed(seed),
                       recipe, channels_last=channels_last)
    stats = train_gan(Agent(generator, discriminator, opt_g, opt_d),
                      _batches(images, labels), local)
    return [list(row) for row in zip(stats.loss_d, stats.loss_g, stats.d_x, stats.d_gz,
                                     strict=True)]


DEFAULTS = RunConfig.defaults()
RECIPES = {
    "app-default": (gan_config(DEFAULTS, (1, 28, 28), 10), StepRecipe.from_settings(DEFAULTS)),
    "dcgan": (GANConfig(), StepRecipe()),
    "hinge-spectral-diffaugment": (GANConfig(d_norm="spectral"),
                                   StepRecipe(loss="hinge", augment="translation,cutout")),
    "acgan": (GANConfig(num_classes=10, conditioning="acgan"), StepRecipe(augment="translation")),
    "projection": (GANConfig(num_classes=10, conditioning="projection", d_norm="spectral"),
                   StepRecipe(loss="hinge")),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_fast_step_is_exactly_the_reference_math(name: str) -> None:
    # Prepare
    cfg, recipe = RECIPES[name]

    # Execute
    expected = reference_step_losses(cfg, recipe, seed=3)
    actual = fast_step_losses(cfg, recipe, seed=3, channels_last=False)

    # Assert: one host sync per call, the fused D pass and no D weight gradients in
    # G's step change no bit (the first layers: tests/test_models.py)
    assert actual == expected


@pytest.mark.parametrize("name", list(RECIPES))
def test_layers_layouts_and_fused_adam_change_only_float_rounding(name: str) -> None:
    # Prepare
    cfg, recipe = RECIPES[name]

    # Execute
    expected = reference_step_losses(cfg, recipe, seed=3, steps=CL_STEPS, plain=True)
    actual = fast_step_losses(cfg, recipe, seed=3, channels_last=True, steps=CL_STEPS)

    # Assert
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected),
                               rtol=0, atol=CL_ATOL)


def test_step_is_reproducible_and_seed_sensitive() -> None:
    # Execute
    cfg, recipe = RECIPES["hinge-spectral-diffaugment"]
    first = fast_step_losses(cfg, recipe, seed=5, channels_last=True)
    again = fast_step_losses(cfg, recipe, seed=5, channels_last=True)
    other = fast_step_losses(cfg, recipe, seed=6, channels_last=True)

    # Assert
    assert first == again
    assert first != other


def test_proximal_term_pulls_towards_the_received_model() -> None:
    # Prepare
    generator, _ = build_gan(GANConfig(), 0)
    anchor = [p.detach().clone() for p in generator.parameters()]
    moved = copy.deepcopy(generator)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.1)

    # Execute
    at_anchor = proximal_term(generator, anchor, mu=0.5)
    away = proximal_term(moved, anchor, mu=0.5)

    # Assert: zero at the anchor, mu/2 * ||0.1||^2 per weight away from it
    assert at_anchor.item() == 0.0
    count = sum(p.numel() for p in generator.parameters())
    assert away.item() == pytest.approx(0.25 * 0.01 * count, rel=1e-4)


def test_fedprox_keeps_weights_closer_to_the_start() -> None:
    # Prepare
    images, labels = _data()
    drift = {}
    for mu in (0.0, 10.0):
        generator, discriminator = build_gan(GANConfig(), 0)
        start = [p.detach().clone() for p in generator.parameters()]
        opt_g, opt_d = make_optimizers(generator, discriminator, 1e-3, 1e-3, (0.5, 0.999))

        # Execute
        train_gan(Agent(generator, discriminator, opt_g, opt_d), _batches(images, labels),
                  LocalRound(10, torch.device("cpu"), torch.Generator().manual_seed(0),
                             StepRecipe(proximal_mu=mu)))
        drift[mu] = sum((p - s).pow(2).sum().item()
                        for p, s in zip(generator.parameters(), start, strict=True))

    # Assert
    assert drift[10.0] < drift[0.0]


def test_unknown_loss_or_policy_is_rejected() -> None:
    with pytest.raises(ValueError, match="loss"):
        StepRecipe(loss="wasserstein")
    with pytest.raises(ValueError, match="policy"):
        StepRecipe(augment="translation,rotate")


def test_step_recipe_defaults_are_the_default_run_settings_value_by_value() -> None:
    # Prepare: the recipe the default run's clients use (no FedProx term)
    built = StepRecipe.from_settings(RunConfig.defaults())

    # Execute
    bare = StepRecipe()

    # Assert
    for name in ("loss", "augment", "aux_weight", "proximal_mu", "mode_seeking"):
        assert getattr(bare, name) == getattr(built, name), name


def test_mode_seeking_term_is_one_over_image_distance_per_noise_distance() -> None:
    # Prepare: images 0.5 apart everywhere for noise 2 apart everywhere
    fake, z = torch.zeros(4, 1, 28, 28), torch.zeros(4, 8)

    # Execute
    term = mode_seeking_term(fake, fake + 0.5, z, z + 2.0)
    collapsed = mode_seeking_term(fake, fake, z, z + 2.0)

    # Assert: 1 / (0.5 / 2); a G that ignores its noise pays 1 / 1e-5
    assert term.item() == pytest.approx(4.0, rel=1e-4)
    assert collapsed.item() == pytest.approx(1e5)


def test_mode_seeking_changes_only_g_and_raises_its_reported_loss() -> None:
    # Prepare: one step from the same models, data and noise, with and without it
    images, labels = _data()
    results, buffers = {}, {}
    for weight in (0.0, 1.0):
        generator, discriminator = build_gan(GANConfig(num_classes=10), 0)
        opt_g, opt_d = make_optimizers(generator, discriminator, 2e-4, 2e-4, (0.5, 0.999))

        # Execute
        stats = train_gan(Agent(generator, discriminator, opt_g, opt_d),
                          _batches(images, labels),
                          LocalRound(1, torch.device("cpu"), torch.Generator().manual_seed(0),
                                     StepRecipe(mode_seeking=weight)))
        results[weight] = (stats, [p.detach().clone() for p in generator.parameters()],
                           [p.detach().clone() for p in discriminator.parameters()])
        buffers[weight] = {k: b.clone() for k, b in generator.named_buffers()}

    # Assert: D's step (before G's) is the same; G's differs; G's loss has the term
    (plain, g0, d0), (seeking, g1, d1) = results[0.0], results[1.0]
    assert all(torch.equal(a, b) for a, b in zip(d0, d1, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))
    assert seeking.loss_d == plain.loss_d
    assert seeking.loss_g[0] > plain.loss_g[0] + 0.1
    # G's second (mode-seeking) batch leaves BatchNorm's running statistics and
    # batch count as one step left them: what a batchnorm = 'local' run keeps
    counts = [k for k in buffers[1.0] if k.endswith("num_batches_tracked")]
    assert counts and all(buffers[1.0][k].item() == 1 for k in counts)
    assert buffers[1.0].keys() == buffers[0.0].keys()
    assert all(torch.equal(buffers[1.0][k], buffers[0.0][k]) for k in buffers[0.0])
