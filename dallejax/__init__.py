"""dallejax: the DALL-E discrete VAE and text+image transformer in JAX/Flax."""

__version__ = "0.1.0"
