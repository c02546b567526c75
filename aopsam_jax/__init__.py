"""aopsam-jax: Segment Anything (SAM) and AoP-SAM in JAX/Flax NNX.

The public API, under the names official SAM users know:

    from aopsam_jax import load_sam, SamPredictor, SamAutomaticMaskGenerator
    from aopsam_jax import load_bundle, AopMaskGenerator, load_image

    sam = load_sam("sam_vit_b_01ec64.pth")            # or .safetensors, HF folder, "vit_h"; no torch
    masks = SamAutomaticMaskGenerator(sam).generate(load_image("photo.jpg"))
    masks = AopMaskGenerator(load_bundle()).generate(load_image("photo.jpg"))

The names resolve on first use, so `import aopsam_jax` stays cheap (no JAX
import) and the command-line `--help` pages stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS = {
    "load_sam": ("aopsam_jax.sam.checkpoints", "load_sam"),
    "build_model": ("aopsam_jax.sam.params", "build_model"),
    "get_sam_config": ("aopsam_jax.sam.config", "get_sam_config"),
    "SamPredictor": ("aopsam_jax.sam.predictor", "SamPredictor"),
    "SamAutomaticMaskGenerator": ("aopsam_jax.sam.amg", "SamAutomaticMaskGenerator"),
    "AmgConfig": ("aopsam_jax.sam.amg", "AmgConfig"),
    "load_image": ("aopsam_jax.sam.image_io", "load_image"),
    "load_bundle": ("aopsam_jax.aop.bundle", "load_bundle"),
    "AopMaskGenerator": ("aopsam_jax.aop.pipeline", "AopMaskGenerator"),
    "AsfConfig": ("aopsam_jax.aop.asf", "AsfConfig"),
    "jit": ("aopsam_jax.sam.compile_options", "jit"),
    "compiler_options": ("aopsam_jax.sam.compile_options", "compiler_options"),
}

__all__ = ["AmgConfig", "AopMaskGenerator", "AsfConfig", "SamAutomaticMaskGenerator",
           "SamPredictor", "build_model", "compiler_options", "get_sam_config", "jit",
           "load_bundle", "load_image", "load_sam"]

if TYPE_CHECKING:
  from aopsam_jax.aop.asf import AsfConfig
  from aopsam_jax.aop.bundle import load_bundle
  from aopsam_jax.aop.pipeline import AopMaskGenerator
  from aopsam_jax.sam.amg import AmgConfig
  from aopsam_jax.sam.amg import SamAutomaticMaskGenerator
  from aopsam_jax.sam.config import get_sam_config
  from aopsam_jax.sam.image_io import load_image
  from aopsam_jax.sam.checkpoints import load_sam
  from aopsam_jax.sam.compile_options import compiler_options, jit
  from aopsam_jax.sam.params import build_model
  from aopsam_jax.sam.predictor import SamPredictor


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'aopsam_jax' has no attribute {name!r}")
  module, attr = _EXPORTS[name]
  value = getattr(importlib.import_module(module), attr)
  globals()[name] = value  # resolve once
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
