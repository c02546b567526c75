"""aopsam-jax: Segment Anything (SAM) and AoP-SAM in JAX/Flax NNX."""

__version__ = "0.1.0"
