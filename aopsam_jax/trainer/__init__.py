"""Library code of `python -m aopsam_jax.train` (losses, steps, evaluation, IO)."""
