"""The GAN: models, the local training step, DiffAugment. Pure torch, no Flower, no I/O."""
