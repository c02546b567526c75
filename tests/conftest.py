import atexit
import os
import shutil
import tempfile

import jax

# Parity tests compare float32 results: never let a GPU use TF32 for f32 dots.
jax.config.update("jax_default_matmul_precision", "highest")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# CLIs run in-process by tests must not write compiled programs into ~/.cache.
os.environ.setdefault("AOPSAM_COMPILE_CACHE", "off")
# The native CPU kernel is built once per test session into a temporary folder
# (child processes inherit it), not into the user's ~/.cache.
if "AOPSAM_KERNEL_CACHE" not in os.environ:
  os.environ["AOPSAM_KERNEL_CACHE"] = tempfile.mkdtemp(prefix="aopsam-kernels-")
  atexit.register(shutil.rmtree, os.environ["AOPSAM_KERNEL_CACHE"], True)
