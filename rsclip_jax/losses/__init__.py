"""Contrastive losses over a device mesh (CLIP with all-gathered negatives, chunked CLIP, SigLIP).

A layer of its own, between `data` and `evaluate`: it depends only on JAX, and the trainer (and
benchmarks) import it, never the other way round.
"""

from rsclip_jax.losses.contrastive import clip_loss, naive_clip_loss, naive_siglip_loss, siglip_loss

__all__ = ["clip_loss", "naive_clip_loss", "naive_siglip_loss", "siglip_loss"]
