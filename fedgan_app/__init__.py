"""fedgan: federated DCGAN training with Flower (FedGAN)."""
