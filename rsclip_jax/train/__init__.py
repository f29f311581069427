"""Distributed contrastive training: mesh and sharding, losses, optimiser, train step, checkpoints."""

# `rsclip train`'s exit status after Ctrl-C: a checkpoint was saved, but the run is not finished
# (the launcher and the sweep read it as an interruption, not a failure).
INTERRUPTED_EXIT_CODE = 130
