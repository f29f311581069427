"""rsclip_jax: RemoteCLIP in JAX/Flax."""
