"""DCGAN shapes, init and the pack/unpack round trip."""

from __future__ import annotations

import pytest
import torch

from fedgan_app.models import (
    D_PREFIX,
    G_PREFIX,
    GANConfig,
    ModelShapeError,
    build_gan,
    pack_gan,
    unpack_gan,
)


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


def test_pack_unpack_round_trip_is_exact_with_batchnorm_buffers() -> None:
    # Prepare: run a forward pass in train mode so BN running stats move
    generator, discriminator = build_gan(GANConfig(), 1)
    discriminator(generator(torch.randn(8, 100)))
    target_g, target_d = build_gan(GANConfig(), 2)

    # Execute
    record = pack_gan(generator, discriminator)
    unpack_gan(record, target_g, target_d)

    # Assert
    keys = list(record.keys())
    assert any(k.startswith(G_PREFIX) and "running_mean" in k for k in keys)
    assert any(k.startswith(D_PREFIX) and "num_batches_tracked" in k for k in keys)
    for src, dst in ((generator, target_g), (discriminator, target_d)):
        for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
            assert a.dtype == b.dtype


def test_unpack_rejects_foreign_keys() -> None:
    generator, discriminator = build_gan(GANConfig(), 1)
    record = pack_gan(generator, discriminator)
    record["other.weight"] = record[G_PREFIX + "net.0.weight"]
    with pytest.raises(KeyError, match="other.weight"):
        unpack_gan(record, generator, discriminator)


@pytest.mark.parametrize("channels,size", [(2, 28), (1, 30), (1, 128)])
def test_unsupported_shapes_fail_clearly(channels: int, size: int) -> None:
    with pytest.raises(ModelShapeError):
        GANConfig(channels=channels, image_size=size)
