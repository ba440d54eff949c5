"""DCGAN shapes, init, variants and defaults (packing: tests/test_message.py)."""

from __future__ import annotations

import pytest
import torch

from fedgan_app.config import RunConfig
from fedgan_app.gan.models import (
    GANConfig,
    ModelShapeError,
    build_gan,
    gan_config,
    minibatch_std,
    pick_device,
    recalibrate_batchnorm,
)
from fedgan_app.gan.training import to_channels_last
from fedgan_app.protocol.message import pack_gan, unpack_gan


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_shapes(channels: int, size: int) -> None:
    # Prepare
    generator, discriminator = build_gan(GANConfig(channels=channels, image_size=size), 0)

    # Execute
    images = generator(torch.randn(5, 100))

    # Assert
    assert images.shape == (5, channels, size, size)
    assert images.min() >= -1 and images.max() <= 1
    assert discriminator(images).shape == (5,)


def test_same_seed_same_weights_and_dcgan_init() -> None:
    # Execute
    g1, _ = build_gan(GANConfig(), 7)
    g2, _ = build_gan(GANConfig(), 7)
    g3, _ = build_gan(GANConfig(), 8)

    # Assert
    w1, w2, w3 = (g.net[0].weight for g in (g1, g2, g3))
    assert torch.equal(w1, w2) and not torch.equal(w1, w3)
    assert abs(w1.std().item() - 0.02) < 0.002


@pytest.mark.parametrize("channels,size", [(2, 28), (1, 30), (1, 128)])
def test_unsupported_shapes_fail_clearly(channels: int, size: int) -> None:
    with pytest.raises(ModelShapeError):
        GANConfig(channels=channels, image_size=size)


def test_device_choice_follows_cuda_availability(monkeypatch: pytest.MonkeyPatch) -> None:
    # Execute / Assert: no CUDA -> auto is the CPU, and cuda is a clear error
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="'device' is 'cuda'"):
        pick_device("cuda")
    # With CUDA, auto picks it (a GPU machine; checked here without one)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("cuda") == torch.device("cuda")


@pytest.mark.parametrize("cfg", [
    GANConfig(num_classes=10, conditioning="acgan"),
    GANConfig(num_classes=10, conditioning="projection"),
    GANConfig(d_norm="spectral", g_width=16, d_width=16),
    GANConfig(num_classes=10, d_minibatch_std=4),
    GANConfig(d_norm="spectral", d_minibatch_std=4),
    GANConfig(num_classes=10, g_conditioning="batchnorm"),
    GANConfig(num_classes=10, g_depth=2, g_conditioning="batchnorm"),
    GANConfig(channels=3, image_size=32, g_depth=1),
])
def test_conditional_and_spectral_variants_shapes_and_packing(cfg: GANConfig) -> None:
    # Prepare
    generator, discriminator = build_gan(cfg, 0)
    labels = torch.arange(6) % 10 if cfg.num_classes else None

    # Execute
    images = generator(torch.randn(6, cfg.latent_dim), labels)
    logits = discriminator(images, labels)
    target_g, target_d = build_gan(cfg, 1)
    unpack_gan(pack_gan(generator, discriminator), target_g, target_d)

    # Assert
    size = cfg.image_size
    assert images.shape == (6, cfg.channels, size, size) and logits.shape == (6,)
    extra = [m for m in generator.net if isinstance(m, torch.nn.Conv2d)]
    assert [m.kernel_size for m in extra] == [(3, 3)] * cfg.g_depth
    for a, b in zip(discriminator.state_dict().values(), target_d.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    if cfg.conditioning == "acgan" and cfg.num_classes:
        assert discriminator.class_logits(discriminator.features(images)).shape == (6, 10)


def test_conditional_generator_needs_labels_and_bad_settings_fail() -> None:
    generator, _ = build_gan(GANConfig(num_classes=10), 0)
    with pytest.raises(ValueError, match="needs labels"):
        generator(torch.randn(2, 100))
    with pytest.raises(ModelShapeError, match="num_classes"):
        GANConfig(num_classes=1)
    with pytest.raises(ModelShapeError, match="d_norm"):
        GANConfig(d_norm="layernorm")
    with pytest.raises(ModelShapeError, match="g_depth must be >= 0, got -1"):
        GANConfig(g_depth=-1)


def test_conditional_batchnorm_gives_each_class_its_own_gain_and_bias() -> None:
    # Prepare: a G whose BatchNorm layers take the label, and the same G without
    cfg = GANConfig(num_classes=10, g_conditioning="batchnorm")
    generator, _ = build_gan(cfg, 0)
    plain, _ = build_gan(GANConfig(num_classes=10), 0)
    layers = [generator.net[1], generator.net[4]]
    z, labels = torch.randn(8, 100), torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    start = [layer.embed.weight.detach().clone() for layer in layers]

    # Execute: one backward pass through G, then class 3's gains doubled
    generator(z, labels).square().sum().backward()
    before = generator.eval()(z, labels)
    with torch.no_grad():
        layers[1].embed.weight[3, :64] *= 2.0
    after = generator(z, labels)

    # Assert: every class starts as plain BatchNorm does (gain ~ N(1, 0.02), bias 0);
    # only the rows of the classes in the batch got gradient; a class's rows
    # change only its own images; the rest of G is plain G's, key for key
    for layer, weight in zip(layers, start, strict=True):
        gain, bias = weight.chunk(2, dim=1)
        assert abs(gain.mean().item() - 1.0) < 0.01 and 0.01 < gain.std().item() < 0.03
        assert torch.equal(bias, torch.zeros_like(bias))
        grad = layer.embed.weight.grad.abs().sum(dim=1)
        assert (grad[:4] > 0).all() and (grad[4:] == 0).all()
    changed = (after - before).flatten(1).abs().amax(dim=1) > 0
    assert changed.tolist() == [label == 3 for label in labels.tolist()]
    assert not any(k.endswith(".weight") and k.startswith(("net.1.", "net.4."))
                   and "embed" not in k for k in generator.state_dict())
    others = {k: v.shape for k, v in generator.state_dict().items() if "net.1" not in k
              and "net.4" not in k}
    assert others == {k: v.shape for k, v in plain.state_dict().items() if "net.1" not in k
                      and "net.4" not in k}


def test_conditional_batchnorm_statistics_are_recalibrated_from_noise() -> None:
    # Prepare: a conditional-BatchNorm G with stale statistics (mean 0, var 1)
    generator, _ = build_gan(GANConfig(num_classes=10, g_conditioning="batchnorm"), 0)

    # Execute
    recalibrate_batchnorm(generator, num_batches=4, batch_size=64, seed=3)

    # Assert: the first layer's statistics are its activations' over the labelled noise
    rng = torch.Generator().manual_seed(3)
    codes = []
    for _ in range(4):
        z = torch.randn(64, 100, generator=rng)
        codes.append(generator.code(z, torch.randint(0, 10, (64,), generator=rng)))
    with torch.no_grad():
        acts = generator.net[0](torch.cat(codes).view(256, -1, 1, 1))
    torch.testing.assert_close(generator.net[1].running_mean, acts.mean(dim=(0, 2, 3)),
                               rtol=1e-4, atol=1e-5)
    assert not generator.training


def test_conditional_batchnorm_needs_a_conditional_gan() -> None:
    with pytest.raises(ModelShapeError, match="g_conditioning 'batchnorm' needs a class"):
        GANConfig(g_conditioning="batchnorm")
    with pytest.raises(ModelShapeError, match="g_conditioning must be one of"):
        GANConfig(num_classes=10, g_conditioning="film")


def test_recalibrated_batchnorm_statistics_match_the_weights() -> None:
    # Prepare: G whose running statistics are stale (never updated: mean 0, var 1)
    generator, _ = build_gan(GANConfig(), 0)
    layer = generator.net[1]

    # Execute
    recalibrate_batchnorm(generator, num_batches=8, batch_size=64, seed=3)

    # Assert: the statistics are those of G's own activations, and G is in eval mode
    with torch.no_grad():
        z = torch.randn(512, 100, generator=torch.Generator().manual_seed(3))
        acts = generator.net[0](z.view(512, -1, 1, 1))
    assert not generator.training
    torch.testing.assert_close(layer.running_mean, acts.mean(dim=(0, 2, 3)),
                               rtol=0.05, atol=1e-3)
    assert layer.momentum == 0.1  # restored


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("cfg", [GANConfig(num_classes=10, conditioning="projection"),
                                 GANConfig(channels=3, image_size=32, d_norm="spectral")])
def test_first_layers_as_matrix_products_equal_the_convolutions(
        cfg: GANConfig, channels_last: bool) -> None:
    # Prepare: the nets, and inputs that need gradients as in G's step
    generator, discriminator = build_gan(cfg, seed=3)
    if channels_last:
        to_channels_last(generator, discriminator)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(8, cfg.latent_dim, generator=gen)
    labels = torch.randint(0, 10, (8,), generator=gen) if cfg.num_classes else None
    images = torch.rand(8, cfg.channels, cfg.image_size, cfg.image_size, generator=gen)
    images = (images * 2 - 1).requires_grad_()
    discriminator.eval()  # spectral norm: one weight for both paths

    # Execute: the app's layers, and torch's transposed convolution and convolution
    code = generator.code(z, labels)
    fast_g = generator._project(code)
    plain_g = generator.net[0](code.view(8, -1, 1, 1))
    fast_d = discriminator._first_layer(images)
    upstream = torch.rand(fast_d.shape, generator=gen) * 2 - 1  # a gradient from above
    (fast_grad,) = torch.autograd.grad(fast_d, images, upstream)
    plain_d = discriminator.net[0](images)
    (plain_grad,) = torch.autograd.grad(plain_d, images, upstream)

    # Assert: the same values and input gradient, to float rounding (sums of up to
    # 48 products in another order: ~4e-6 measured)
    torch.testing.assert_close(fast_g, plain_g, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_d, plain_d, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_grad, plain_grad, rtol=1e-4,
                               atol=1e-5 * plain_grad.abs().max().item())
    # and the layout the next layer is stored in
    assert fast_d.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_gan_config_defaults_are_the_default_run_settings_value_by_value() -> None:
    # Prepare: the GANConfig the default run builds for 28x28 grey images of 10 classes
    built = gan_config(RunConfig.defaults(), (1, 28, 28), num_classes=10)

    # Execute
    bare = GANConfig()

    # Assert: every architecture field a setting decides, one by one
    for name in ("latent_dim", "g_width", "d_width", "d_norm", "conditioning",
                 "d_minibatch_std"):
        assert getattr(bare, name) == getattr(built, name), name
    assert (bare.channels, bare.image_size) == (built.channels, built.image_size)
    assert built.num_classes == 10 and bare.num_classes == 0  # the data decides this one


def test_minibatch_std_adds_each_groups_spread_and_never_mixes_groups() -> None:
    # Prepare: 8 feature maps; the first group of 4 all equal, the second spread out
    h = torch.zeros(8, 3, 2, 2)
    h[4:] = torch.arange(4.0).view(4, 1, 1, 1)

    # Execute
    out = minibatch_std(h, 4)
    changed = h.clone()
    changed[5] += 10.0
    again = minibatch_std(changed, 4)

    # Assert: one more channel; the equal group's spread is 0, the other's the std
    # of 0, 1, 2, 3; changing an image of group 2 leaves group 1's channel alone
    assert out.shape == (8, 4, 2, 2) and torch.equal(out[:, :3], h)
    assert out[:4, 3].abs().max().item() < 1e-3
    assert out[4:, 3] == pytest.approx(torch.full((4, 2, 2), 1.118034), abs=1e-4)
    assert torch.equal(again[:4, 3], out[:4, 3]) and not torch.equal(again[4:, 3], out[4:, 3])


@pytest.mark.parametrize("batch,size", [(6, 3), (5, 1), (1, 1)])
def test_minibatch_std_groups_divide_any_batch(batch: int, size: int) -> None:
    # A batch of 6 makes 2 groups of 3; a prime batch groups of 1 (no spread), one image 1
    h = torch.randn(batch, 2, 3, 3, generator=torch.Generator().manual_seed(batch))

    out = minibatch_std(h, 4)

    assert out.shape == (batch, 3, 3, 3)
    channel = out[:, 2, 0, 0]
    for start in range(0, batch, size):
        group = h[start:start + size]
        expected = group.var(dim=0, unbiased=False).add(1e-8).sqrt().mean().item()
        assert channel[start:start + size] == pytest.approx([expected] * size, rel=1e-5)


def test_minibatch_std_makes_d_tell_a_collapsed_batch_from_a_spread_one() -> None:
    # Prepare: D with minibatch std; a batch of 8 copies of one image and 8 distinct ones
    _, discriminator = build_gan(GANConfig(d_minibatch_std=4), 0)
    discriminator.eval()
    spread = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    collapsed = spread[:1].expand(8, -1, -1, -1)

    # Execute
    h_spread, h_collapsed = discriminator.features(spread), discriminator.features(collapsed)

    # Assert: the head's extra channel is 0 for the copies and not for the others
    assert discriminator.head.weight.shape[1] == h_spread.shape[1] + 1
    collapsed_spread = minibatch_std(h_collapsed, 4)[:, -1].abs().max().item()
    assert collapsed_spread < 1e-3
    assert minibatch_std(h_spread, 4)[:, -1].min().item() > 10 * collapsed_spread


@pytest.mark.parametrize("d_norm", ["batchnorm", "spectral"])
def test_the_head_s_two_sums_equal_the_head_on_the_concatenated_channel(d_norm: str) -> None:
    # Prepare: D with minibatch std, in its training layout; eval, so spectral norm's
    # power iteration does not change the weight between the two reads
    _, discriminator = build_gan(GANConfig(num_classes=10, d_minibatch_std=4, d_norm=d_norm), 0)
    to_channels_last(discriminator)
    discriminator.eval()
    rng = torch.Generator().manual_seed(0)
    h = discriminator.features(torch.rand(8, 1, 28, 28, generator=rng) * 2 - 1)

    # Execute
    fast = discriminator.logits(h, torch.arange(8))
    head = discriminator.head(minibatch_std(h, 4)).view(-1)
    projection = (discriminator.embed(torch.arange(8)).view_as(h) * h).sum(dim=(1, 2, 3))

    # Assert: the same sums in another order: float rounding, relative to the
    # largest logit (an untrained spectral D's reach 1e4)
    expected = head + projection
    scale = expected.abs().max().item()
    torch.testing.assert_close(fast, expected, atol=1e-5 * scale, rtol=0)
