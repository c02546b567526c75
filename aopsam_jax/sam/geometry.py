"""The three frames an image passes through, and the maps between them.

  original   H0 x W0, the user's image.  Point (x, y) in pixels, pixel
             centres at +0.5 (the official convention).
  input      img_size x img_size (1024): the image resized so its longest
             side is img_size (`input_hw` = (h, w), the official
             `get_preprocess_shape`) and zero-padded bottom/right.  A point
             maps to (x * w / W0, y * h / H0) (the official `apply_coords`).
  low-res    img_size / 4 square (256): the mask decoder's low-res logits
             and the AoP-SAM prompt heatmap share this grid; its pixel
             (i, j) covers input pixels [4i, 4i+4) x [4j, 4j+4), so a
             low-res xy times `LOW_RES_STRIDE` is an input-frame xy.

Functions taking sizes accept numpy or jax arrays (and work under jit)
unless they say "host".
"""

from __future__ import annotations

from typing import Tuple

import jax.numpy as jnp
import numpy as np

from aopsam_jax.sam.transforms import get_preprocess_shape

LOW_RES_STRIDE = 4  # input pixels per low-res / heatmap pixel


def low_res_size(img_size: int = 1024) -> int:
  """Side of the low-res / heatmap grid for a padded input of `img_size`."""
  return img_size // LOW_RES_STRIDE


def input_hw(h0: int, w0: int, img_size: int = 1024) -> Tuple[int, int]:
  """Host: (h, w) of the resized image inside the padded input."""
  return get_preprocess_shape(h0, w0, img_size)


def input_to_original_scale(input_hw, original_hw):
  """xy factors (W0 / w, H0 / h) from the input frame to the original one."""
  xp = jnp if isinstance(input_hw, jnp.ndarray) or isinstance(original_hw, jnp.ndarray) else np
  ohw = xp.asarray(original_hw).astype(xp.float32)
  ihw = xp.asarray(input_hw).astype(xp.float32)
  return ohw[..., ::-1] / ihw[..., ::-1]


def input_to_original(xy, input_hw, original_hw):
  """Input-frame xy (..., 2) -> original-image xy."""
  return xy * input_to_original_scale(input_hw, original_hw)


def heatmap_to_original(xy_hm: np.ndarray, h0: int, w0: int, img_size: int = 1024) -> np.ndarray:
  """Host: low-res / heatmap xy (..., 2) -> original-image xy (the inverse of
  `apply_coords` after the stride)."""
  ih, iw = input_hw(h0, w0, img_size)
  return np.asarray(xy_hm, np.float64) * LOW_RES_STRIDE * np.array([w0 / iw, h0 / ih])


def low_res_centres(size: int) -> np.ndarray:
  """Host: input-frame coordinate of each low-res pixel centre along one axis."""
  return np.arange(size) * LOW_RES_STRIDE + LOW_RES_STRIDE / 2.0


def low_res_valid_region(input_hw, low_res: int, img_size: int):
  """(low, low) bool: low-res pixels that cover the resized (unpadded) image."""
  scale = img_size / low_res
  rows = jnp.arange(low_res) * scale < input_hw[0]
  cols = jnp.arange(low_res) * scale < input_hw[1]
  return rows[:, None] & cols[None, :]
