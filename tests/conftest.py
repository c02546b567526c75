import os

import jax

# Parity tests compare float32 results: never let a GPU use TF32 for f32 dots.
jax.config.update("jax_default_matmul_precision", "highest")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# CLIs run in-process by tests must not write compiled programs into ~/.cache.
os.environ.setdefault("AOPSAM_COMPILE_CACHE", "off")
