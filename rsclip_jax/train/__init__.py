"""Distributed contrastive training: mesh and sharding, losses, optimiser, train step, checkpoints."""
